"""The probe's quantities to TensorBoard and W&B (gammatrace.integrations.loggers), read back
from the files each writes — TensorBoard's event files, W&B's offline run folder — and
compared with ``probe.steps()``, every step and every N steps. W&B runs offline only.
"""

from __future__ import annotations

import glob
import json
import math
import struct
import time

import numpy as np
import pytest
import torch
from torch import nn

import gammatrace  # noqa: E402
from gammatrace.integrations.loggers import REFERENCE_LOGGED, StepLog, TensorBoardSink, WandbSink  # noqa: E402
from tests.test_integrations_support import need

STEPS = 7


def trained(log: list, reference=None, log_every: int = 1) -> gammatrace.Probe:
    """A small loop whose probe is logged to ``log``'s sinks after every step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    loss_fn = lambda m, b: nn.functional.mse_loss(m(b[0]), b[1])  # noqa: E731
    if reference == "end":  # θ* = where this very loop ends (train once, then measure)
        reference = dict(trained([], None).model.state_dict())
    probe = gammatrace.Probe(model, opt, loss_fn, reference=reference)
    stream = StepLog(probe, log, log_every=log_every)
    g = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        batch = (torch.randn(8, 4, generator=g), torch.randn(8, 1, generator=g))
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        probe.batch(batch, loss)
        opt.step()
        stream.update()
    stream.close()
    return probe


def expected(probe: gammatrace.Probe, log_every: int) -> dict[str, dict[int, float]]:
    steps = probe.steps()
    steps["dist_ratio"] = np.sqrt(steps["dist_sq"] / steps["dist_sq"].iloc[0])
    due = steps[steps["step"] % log_every == 0]
    return {f"gammatrace/{c}": dict(zip(due["step"].tolist(), due[c].tolist(), strict=True)) for c in REFERENCE_LOGGED}


def assert_logged(got: dict[str, dict[int, float]], want: dict[str, dict[int, float]]) -> None:
    assert set(got) >= set(want)
    for name, values in want.items():
        assert sorted(got[name]) == sorted(values), name
        for step, value in values.items():
            assert got[name][step] == value or (math.isnan(value) and math.isnan(got[name][step])), (name, step)


@pytest.mark.parametrize("log_every", [1, 3])
def test_tensorboard_event_files_hold_probe_steps(tmp_path, log_every):
    need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util
    from torch.utils.tensorboard import SummaryWriter

    probe = trained([TensorBoardSink(SummaryWriter(str(tmp_path)))], reference="end", log_every=log_every)
    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    events.Reload()
    got = {tag: {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)}
           for tag in events.Tags()["tensors"]}
    assert_logged(got, expected(probe, log_every))


def wandb_records(path: str) -> list:
    """The records of a W&B offline run file (a LevelDB-style log of protobufs)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    block, pos, buf, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        buf, pos = buf + data[pos:pos + length], pos + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def read_wandb_history(run_dir: str, timeout: float = 60.0) -> list[dict]:
    """The history rows of the W&B offline run in ``run_dir``, once its writer has closed it
    (``run.finish()`` can return before W&B's service process has written the last records)."""
    [path] = glob.glob(f"{run_dir}/wandb/offline-run-*/run-*.wandb")
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            for r in records if r.WhichOneof("record_type") == "history"]


@pytest.mark.parametrize("log_every", [1, 3])
def test_wandb_offline_run_holds_probe_steps(tmp_path, monkeypatch, log_every):
    wandb = need("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # never the network
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(mode="offline", dir=str(tmp_path), project="gammatrace-test",
                     settings=wandb.Settings(console="off", x_disable_stats=True))
    try:
        probe = trained([WandbSink(run)], reference="end", log_every=log_every)
    finally:
        run.finish()
    got: dict[str, dict[int, float]] = {}
    for row in read_wandb_history(str(tmp_path)):
        for name, value in row.items():
            if name.startswith("gammatrace/") and name != "gammatrace/step":
                got.setdefault(name, {})[int(row["gammatrace/step"])] = float(value)
    assert_logged(got, expected(probe, log_every))


def test_record_mode_logs_loss_update_and_gradient():
    seen: list = []
    probe = trained([lambda step, values: seen.append((step, dict(values)))], log_every=2)
    rows = probe.steps()
    assert [s for s, _ in seen] == [0, 2, 4, 6]
    for step, values in seen:
        row = rows[rows["step"] == step].iloc[0]
        assert values == {"gammatrace/loss": row["loss"], "gammatrace/update_sq": row["update_sq"],
                          "gammatrace/grad_sq": row["grad_sq"], "gammatrace/skipped": 0.0}
