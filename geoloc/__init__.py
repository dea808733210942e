"""geoloc: multi-view visual geolocation (US state + GPS) after PIGEON, on Accelerate and WebDataset."""

__version__ = "0.1.0"
