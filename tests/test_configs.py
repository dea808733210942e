"""accelerate_configs/*.yaml and ds_configs/*.json: contents, and that accelerate itself accepts them.

"Accepts" goes through accelerate's own code paths without GPUs: the launcher's config loading and
validation (``_validate_launch_command``, as ``accelerate launch`` runs it), the environment it builds for
the training processes, and for DeepSpeed the ``DeepSpeedPlugin`` the processes would build from that
environment, with every ``"auto"`` filled the way ``Accelerator.prepare`` fills it. ``cpu.yaml`` is also
launched for real.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "accelerate_configs"

# file -> (distributed_type, num_processes, num_machines, mixed_precision, DeepSpeed JSON)
EXPECTED = {
    "1gpu.yaml": ("NO", 1, 1, "bf16", None),
    "4xa100.yaml": ("MULTI_GPU", 4, 1, "bf16", None),
    "4xa100_zero2.yaml": ("DEEPSPEED", 4, 1, None, "ds_configs/zero2.json"),
    "4xa100_zero3.yaml": ("DEEPSPEED", 4, 1, None, "ds_configs/zero3.json"),
    "cpu.yaml": ("NO", 1, 1, "no", None),
    "2x4xa100.yaml": ("MULTI_GPU", 8, 2, "bf16", None),
}


def test_every_config_is_covered():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_yaml_parses_with_expected_values(name):
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(CONFIGS / name))  # accelerate's own loader: rejects unknown keys
    dist, procs, machines, precision, ds_json = EXPECTED[name]
    assert (cfg.distributed_type.value, cfg.num_processes, cfg.num_machines) == (dist, procs, machines)
    assert cfg.mixed_precision == precision
    assert cfg.use_cpu == (name == "cpu.yaml")
    if ds_json:
        assert cfg.deepspeed_config["deepspeed_config_file"] == ds_json
        assert (REPO / ds_json).is_file()


def test_multi_node_example_has_rendezvous_fields():
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(CONFIGS / "2x4xa100.yaml"))
    assert cfg.machine_rank == 0 and cfg.main_process_port == 29500 and cfg.main_process_ip


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_json(stage):
    ds = json.loads((REPO / f"ds_configs/zero{stage}.json").read_text())
    assert "optimizer" not in ds and "scheduler" not in ds  # the trainer's AdamW keeps per-group lrs
    assert ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"]["stage"] == stage
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps"):
        assert ds[key] == "auto"
    assert ds["bf16"]["enabled"] == "auto"
    if stage == 3:  # one gathered weights file on export
        assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.fixture(autouse=True)
def _port_29500_free(monkeypatch):
    """Port 29500 may be taken on a shared test machine; a real launch happens on the training machines."""
    monkeypatch.setattr("accelerate.utils.launch.is_port_in_use", lambda port: False)


def _launch(config: str, *flags: str):
    """``(args, env)``: torchrun arguments and process environment of ``accelerate launch`` for ``config``."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import (
        prepare_deepspeed_cmd_env,
        prepare_multi_gpu_env,
        prepare_simple_launcher_cmd_env,
    )

    args = launch_command_parser().parse_args(["--config_file", config, *flags, "train.py"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # as accelerate's launch_command does before the DeepSpeed launcher
        fields = list(defaults.deepspeed_config) + (
            ["mixed_precision"] if mixed_precision_from_config else []
        )
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return args, prepare_deepspeed_cmd_env(args)[1]
    if args.multi_gpu:
        return args, prepare_multi_gpu_env(args)  # sets the torchrun arguments on args
    return args, prepare_simple_launcher_cmd_env(args)[1]


@pytest.mark.parametrize("name", ["1gpu.yaml", "4xa100.yaml", "2x4xa100.yaml", "cpu.yaml"])
def test_launcher_accepts_non_deepspeed_configs(name, monkeypatch):
    monkeypatch.chdir(REPO)
    args, env = _launch(f"accelerate_configs/{name}")
    dist, _, machines, precision, _ = EXPECTED[name]
    assert env["ACCELERATE_MIXED_PRECISION"] == precision
    if dist == "MULTI_GPU":
        assert args.nproc_per_node == "4"  # torchrun processes on each machine
        if machines > 1:
            assert (args.nnodes, args.node_rank) == ("2", 0)
            rendezvous = getattr(args, "master_port", "") + getattr(args, "rdzv_endpoint", "")
            assert rendezvous.endswith("29500")
    else:
        assert env.get("ACCELERATE_USE_CPU", "False") == str(name == "cpu.yaml")


@pytest.mark.parametrize("stage", [2, 3])
@pytest.mark.parametrize("flag, bf16", [(("--mixed_precision", "bf16"), True), ((), False)])
def test_deepspeed_plugin_accepts_zero_configs(stage, flag, bf16, monkeypatch):
    from accelerate.utils import DeepSpeedPlugin

    monkeypatch.chdir(REPO)  # deepspeed_config_file is relative to the repository root
    _, env = _launch(f"accelerate_configs/4xa100_zero{stage}.yaml", *flag)
    for key, value in env.items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    plugin = DeepSpeedPlugin()  # what each process builds; raises on config fields accelerate refuses
    assert plugin.zero_stage == stage
    plugin.set_mixed_precision(env["ACCELERATE_MIXED_PRECISION"])
    # the values Accelerator.prepare fills in (batch 8 per GPU, 2 accumulation steps, 4 GPUs)
    fill = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2, "train_batch_size": 64}
    plugin.deepspeed_config_process(must_match=False, **fill)
    config = plugin.deepspeed_config
    assert "auto" not in json.dumps(config)  # nothing left for a model.config that GeoModel lacks
    assert config["bf16"]["enabled"] is bf16  # bf16 comes from --mixed_precision, see the yaml comment
    assert config["train_batch_size"] == 64


def test_deepspeed_config_refuses_mixed_precision_in_yaml(tmp_path, monkeypatch):
    """Why the zero yamls carry no mixed_precision: accelerate rejects it beside a deepspeed_config_file."""
    from accelerate.utils import DeepSpeedPlugin

    monkeypatch.chdir(REPO)
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "4xa100_zero2.yaml").read_text() + "mixed_precision: bf16\n")
    for key, value in _launch(str(bad))[1].items():
        if key.startswith("ACCELERATE_"):
            monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match="will be ignored"):
        DeepSpeedPlugin()


def test_cpu_config_really_launches(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(
        "from accelerate import Accelerator\n"
        "acc = Accelerator()\n"
        "print('PROBE', acc.distributed_type.value, acc.num_processes, acc.device, acc.mixed_precision)\n"
    )
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", "accelerate_configs/cpu.yaml"]
    result = subprocess.run(
        [*cmd, str(script)], cwd=REPO, check=False, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "PROBE NO 1 cpu no" in result.stdout
