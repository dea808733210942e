"""CheckpointManager with a real Accelerator(cpu=True): round trip, pruning, crash safety, no code from
pickles, damaged files, clear errors."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from geoloc.errors import CheckpointError
from geoloc.train.checkpoint import (
    ENGINE_DIR,
    MODEL_FILE,
    OPTIMIZER_FILE,
    STATE_FILE,
    CheckpointManager,
    _file_table,
)
from geoloc.train.ema import EMA
from geoloc.train.schedule import make_scheduler


@pytest.fixture
def setup():
    """A prepared model + AdamW, a warm-up/cosine scheduler and EMA, as the trainer wires them."""
    torch.manual_seed(0)
    acc = Accelerator(cpu=True)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GELU(), torch.nn.Linear(8, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, opt = acc.prepare(model, opt)
    sched = make_scheduler(opt, total_steps=20, warmup_steps=3)
    ema = EMA(model, 0.9)
    yield acc, model, opt, sched, ema
    AcceleratorState._reset_state(reset_partial_state=True)


def _parts(setup):
    _, model, opt, sched, ema = setup
    return SimpleNamespace(model=model, optimizer=opt, scheduler=sched, ema=ema)


def _train(acc, model, opt, sched, ema, steps):
    for _ in range(steps):
        x = torch.randn(5, 4)  # draws from the RNG that the checkpoint must restore
        loss = model(x).pow(2).mean()
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        ema.update(model)


def _weights(model):
    return [p.detach().clone() for p in model.parameters()]


def test_resume_follows_the_uninterrupted_run(setup, tmp_path):
    acc, model, _, sched, ema = setup
    ckpts = CheckpointManager(tmp_path, acc, keep=2)
    _train(*setup, steps=3)
    state = {"phase": "finetune", "epoch": 1, "step": 3, "batch_index": 7, "best_score": 0.25}
    path = ckpts.save("step-3", state, _parts(setup))
    assert path == tmp_path / "checkpoints" / "step-3" and (path / STATE_FILE).is_file()
    saved_weights, saved_lr = _weights(model), sched.get_last_lr()

    _train(*setup, steps=4)  # the uninterrupted run
    uninterrupted, uninterrupted_ema = _weights(model), ema.shadow["0.weight"].clone()

    assert ckpts.load("latest", _parts(setup)) == state
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), saved_weights, strict=True))
    assert sched.last_epoch == 3 and sched.get_last_lr() == saved_lr
    assert ema.num_updates == 3
    _train(*setup, steps=4)  # resumed: same inputs (RNG), same Adam moments and lr, same EMA
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), uninterrupted, strict=True))
    assert torch.equal(ema.shadow["0.weight"], uninterrupted_ema)


def test_prunes_by_creation_order_not_name_or_mtime(setup, tmp_path):
    acc = setup[0]
    ckpts = CheckpointManager(tmp_path, acc, keep=2)
    for i, tag in enumerate(["d", "a", "c", "b"]):
        ckpts.save(tag, {"step": i}, _parts(setup))
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["b", "c"]
    os.utime(root / "c", (4e9, 4e9))  # newest mtime must not matter
    assert ckpts.latest() == root / "b"
    assert json.loads((root / "b" / STATE_FILE).read_text())["seq"] == 4


def test_unfinished_dirs_never_count_and_are_cleaned(setup, tmp_path):
    acc = setup[0]
    ckpts = CheckpointManager(tmp_path, acc, keep=3)
    ckpts.save("one", {"step": 1}, _parts(setup))
    root = tmp_path / "checkpoints"
    (root / "two.tmp").mkdir()
    (root / "two.tmp" / STATE_FILE).write_text(json.dumps({"seq": 99, "tag": "two", "state": {}}))
    (root / "no-state").mkdir()  # not ours or not finished: ignored, left alone
    assert ckpts.latest() == root / "one"
    ckpts.save("three", {"step": 3}, _parts(setup))
    assert not (root / "two.tmp").exists()
    assert ckpts.latest() == root / "three"
    assert (root / "no-state").exists()


@pytest.mark.parametrize("crash_in", ["write_parts", "state_file"])
def test_interrupted_save_leaves_previous_checkpoint_usable(setup, tmp_path, monkeypatch, crash_in):
    acc, model = setup[0], setup[1]
    ckpts = CheckpointManager(tmp_path, acc, keep=1)
    ckpts.save("good", {"step": 1}, _parts(setup))
    good = _weights(model)
    _train(*setup, steps=2)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    if crash_in == "write_parts":
        monkeypatch.setattr(ckpts, "_write_parts", crash)
    else:
        monkeypatch.setattr("geoloc.train.checkpoint._write_json", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpts.save("bad", {"step": 3}, _parts(setup))
    monkeypatch.undo()

    root = tmp_path / "checkpoints"
    assert (root / "bad.tmp").exists() and not (root / "bad").exists()
    assert ckpts.latest() == root / "good"
    assert ckpts.load("latest", _parts(setup)) == {"step": 1}
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), good, strict=True))


def test_resaving_a_tag_replaces_it(setup, tmp_path):
    ckpts = CheckpointManager(tmp_path, setup[0], keep=2)
    ckpts.save("epoch", {"step": 1}, _parts(setup))
    ckpts.save("epoch", {"step": 2}, _parts(setup))
    root = tmp_path / "checkpoints"
    assert [p.name for p in root.iterdir()] == ["epoch"]
    assert ckpts.load("epoch", _parts(setup)) == {"step": 2}  # a tag resolves under RUN/checkpoints


def test_clear_errors(setup, tmp_path):
    acc = setup[0]
    ckpts = CheckpointManager(tmp_path, acc, keep=1)
    with pytest.raises(FileNotFoundError, match="--resume latest: no finished checkpoint"):
        ckpts.load("latest", _parts(setup))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a finished checkpoint"):
        ckpts.load(tmp_path / "empty", _parts(setup))
    with pytest.raises(ValueError, match="JSON"):
        ckpts.save("x", {"step": torch.tensor(1)}, _parts(setup))
    assert not (tmp_path / "checkpoints" / "x.tmp").exists()
    with pytest.raises(ValueError, match="tag"):
        ckpts.save("../escape", {}, _parts(setup))
    with pytest.raises(ValueError, match="keep"):
        CheckpointManager(tmp_path, acc, keep=0)


class _Planted:
    """A pickle that runs a shell command when unpickled (what an attacker would plant)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _replant_table(ckpt: Path) -> None:
    """An attacker who can write files can also rewrite the recorded sizes and hashes."""
    meta = json.loads((ckpt / STATE_FILE).read_text())
    meta["files"] = _file_table(ckpt)
    (ckpt / STATE_FILE).write_text(json.dumps(meta))


def test_a_planted_pickle_is_refused_and_never_runs(setup, tmp_path):
    ckpts = CheckpointManager(tmp_path, setup[0], keep=1)
    ckpt = ckpts.save("a", {"step": 1}, _parts(setup))
    marker = tmp_path / "pwned"
    torch.save({"state": {}, "param_groups": _Planted(marker)}, ckpt / OPTIMIZER_FILE)
    _replant_table(ckpt)
    with pytest.raises(CheckpointError, match=rf"{OPTIMIZER_FILE}: refused to load.*system"):
        ckpts.load("latest", _parts(setup))
    assert not marker.exists()


def test_pickles_accelerate_would_have_loaded_are_never_read(setup, tmp_path):
    """accelerate's load_state unpickled custom_checkpoint_*.pkl with weights_only=False: not read now."""
    ckpts = CheckpointManager(tmp_path, setup[0], keep=1)
    ckpt = ckpts.save("a", {"step": 1}, _parts(setup))
    marker = tmp_path / "pwned"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "scheduler.bin"):
        torch.save(_Planted(marker), ckpt / name)
    _replant_table(ckpt)
    assert ckpts.load("latest", _parts(setup)) == {"step": 1}
    assert not marker.exists()


def test_a_planted_deepspeed_pickle_is_refused_before_the_engine_reads_it(setup, tmp_path):
    ckpts = CheckpointManager(tmp_path, setup[0], keep=1)
    ckpt = ckpts.save("a", {"step": 1}, _parts(setup))
    (ckpt / ENGINE_DIR).mkdir()
    marker = tmp_path / "pwned"
    torch.save(
        {"module": {}, "ds_config": _Planted(marker)}, ckpt / ENGINE_DIR / "mp_rank_00_model_states.pt"
    )
    _replant_table(ckpt)
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt: refused to load"):
        ckpts.verify(ckpt)
    assert not marker.exists()


def test_damaged_checkpoints_are_skipped_by_latest_and_refused_by_load(setup, tmp_path):
    ckpts = CheckpointManager(tmp_path, setup[0], keep=3)
    first = ckpts.save("first", {"step": 1}, _parts(setup))
    second = ckpts.save("second", {"step": 2}, _parts(setup))
    weights = second / MODEL_FILE
    weights.write_bytes(weights.read_bytes()[:-10])  # a partial copy: recorded size differs
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        assert ckpts.latest() == first
    with pytest.raises(CheckpointError, match="files missing or changed"):
        ckpts.load(second, _parts(setup))
    data = bytearray((first / MODEL_FILE).read_bytes())
    data[-1] ^= 0xFF  # a flipped bit: same size, so only the hash tells
    (first / MODEL_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{MODEL_FILE}"):
        ckpts.load(first, _parts(setup))


_TWO_RANKS = """
import sys, torch
from accelerate import Accelerator
from geoloc.distributed import shutdown
from geoloc.train.checkpoint import CheckpointManager
acc = Accelerator(cpu=True)
assert acc.num_processes == 2
torch.manual_seed(acc.process_index)
from types import SimpleNamespace
from geoloc.train.schedule import make_scheduler
net = torch.nn.Linear(3, 2)
model, opt = acc.prepare(net, torch.optim.AdamW(net.parameters()))
parts = SimpleNamespace(model=model, optimizer=opt, scheduler=make_scheduler(opt, 10, 1), ema=None)
ckpts = CheckpointManager(sys.argv[1], acc, keep=1)
try:
    ckpts.load("latest", parts)
except FileNotFoundError as err:
    assert "no finished checkpoint" in str(err)  # raised on every rank, no hang
ckpts.save("a", {"step": 1}, parts)
ckpts.save("b", {"step": 2}, parts)
after_save = torch.rand(1)
torch.rand(5)
assert ckpts.load("latest", parts) == {"step": 2}
assert torch.equal(torch.rand(1), after_save)  # each rank gets its own RNG back
shutdown()
"""


def test_two_processes(tmp_path):
    script = tmp_path / "two_ranks.py"
    script.write_text(textwrap.dedent(_TWO_RANKS))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(script),
        str(tmp_path),
    ]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "checkpoints" / "b").iterdir())
    assert "rng-rank0.safetensors" in names and "rng-rank1.safetensors" in names
    assert not (tmp_path / "checkpoints" / "a").exists()


_DEEPSPEED = """
import sys, torch
from accelerate import Accelerator
from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs
from geoloc.distributed import shutdown
from geoloc.train.checkpoint import CheckpointManager
run_dir, ds_json = sys.argv[1], sys.argv[2]
plugin = DeepSpeedPlugin(hf_ds_config=ds_json)  # the shipped JSON; the batch size comes from the trainer
plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = 4
acc = Accelerator(deepspeed_plugin=plugin, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
assert acc.num_processes == 2
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 2))
model, opt = acc.prepare(net, torch.optim.AdamW(net.parameters(), lr=1e-2))
from types import SimpleNamespace
from geoloc.train.schedule import make_scheduler
parts = SimpleNamespace(model=model, optimizer=opt, scheduler=make_scheduler(opt, 20, 1), ema=None)

def train(steps):
    for _ in range(steps):
        acc.backward(model(torch.randn(4, 6)).pow(2).mean())
        opt.step()
        opt.zero_grad()

def weights():  # a collective under ZeRO-3; the gathered dict exists on the main rank only
    return {k: v.clone() for k, v in (acc.get_state_dict(model) or {}).items()}

ckpts = CheckpointManager(run_dir, acc, keep=1)
train(2)
ckpts.save("a", {"step": 2}, parts)
train(1)
ckpts.save("b", {"step": 3}, parts)  # every rank writes its ZeRO shards; "a" is pruned
saved = weights()
train(3)
uninterrupted = weights()
train(2)
assert ckpts.load("latest", parts) == {"step": 3}
assert all(torch.equal(saved[k], v) for k, v in weights().items())
train(3)
assert all(torch.allclose(uninterrupted[k], v) for k, v in weights().items())
shutdown()  # a barrier, then every rank destroys its group at once (a rank left behind could abort)
"""


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_two_processes(tmp_path, stage):
    """Under DeepSpeed save_checkpoint is a collective: all ranks save, resume matches the uninterrupted run."""
    pytest.importorskip("deepspeed")
    script = tmp_path / "ds_ranks.py"
    script.write_text(_DEEPSPEED)
    ds_json = Path(__file__).resolve().parents[1] / "ds_configs" / f"zero{stage}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*cmd, str(script), str(tmp_path), str(ds_json)], env=env, check=False, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    names = {p.name for p in (tmp_path / "checkpoints" / "b").iterdir()}
    assert {"pytorch_model", STATE_FILE, "rng-rank0.safetensors", "rng-rank1.safetensors"} <= names
    assert not (tmp_path / "checkpoints" / "a").exists()


class _Counter:
    """A registered stateful object, like the criterion with the metric head's bandit."""

    def __init__(self, needs_state=True):
        self.n, self.needs_state = 0, needs_state

    def state_dict(self):
        return {"n": self.n} if self.needs_state else {}

    def load_state_dict(self, d):
        if self.needs_state and "n" not in d:
            raise ValueError("no saved count")
        self.n = d.get("n", 0)


def test_registered_state_is_saved_as_json_and_restored(setup, tmp_path):
    acc = setup[0]
    counter = _Counter()
    ckpts = CheckpointManager(tmp_path, acc, keep=2, stateful={"loss": counter})
    counter.n = 7
    path = ckpts.save("a", {"step": 1}, _parts(setup))
    assert json.loads((path / STATE_FILE).read_text())["stateful"] == {"loss": {"n": 7}}
    counter.n = 99
    ckpts.load("latest", _parts(setup))
    assert counter.n == 7
    plain = CheckpointManager(tmp_path / "plain", acc, keep=2, stateful={"loss": _Counter(needs_state=False)})
    older = plain.save("b", {"step": 1}, _parts(setup))  # a run whose loss has no state
    with pytest.raises(CheckpointError, match=r"stateful\.loss.*no saved count"):
        CheckpointManager(tmp_path / "plain", acc, keep=2, stateful={"loss": _Counter()}).load(
            older, _parts(setup)
        )
