"""Inference: submission writing and validation, ensembles, TTA, calibration and the evaluation report.

``geoloc.predict`` runs one model over a loader on all ranks; this package turns its predictions into a
competition submission (``submission``), combines several models (``ensemble``), reads the raw test folder
(``raw``) and writes the evaluation report (``report``). ``cli`` is the ``infer.py`` entry point.
"""
