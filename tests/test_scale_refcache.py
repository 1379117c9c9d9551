"""Cached reference losses (issue 15.4): ℓ(θ*; z) from one pass over the training set
instead of a forward per step, where the loss of a sample does not depend on its batch.

Equality with the per-batch reference pass is bit for bit here: the per-sample pass runs
in chunks of the batch size, and on these CPU kernels a sample's loss does not depend on
the other rows of its batch. Where a kernel blocks rows by batch composition it could
differ at float32 round-off: the check at each segment's first step bounds that (1e-6
relative) and the record keeps the largest deviation."""

from __future__ import annotations

import re

import pytest
import torch

from gammatrace.config import RunConfig
from gammatrace.engine.refcache import ReferenceCacheError, reference_losses, why_not_cached
from gammatrace.engine.replay import CACHE_FILE, replay
from gammatrace.engine.session import build_session
from gammatrace.engine.trainer import train_pass
from gammatrace.store.run import Run
from tests.conftest import tiny_config

COLUMNS = ["loss", "loss_ref", "progress", "dist_sq", "update_sq", "grad_dot", "grad_sq"]


def _both(tmp_path, cfg: dict, workers: int = 1):
    cached = train_pass(cfg, tmp_path / "cached", progress=False)
    direct = train_pass(cfg, tmp_path / "direct", progress=False)
    replay(cached.path, "last", progress=False, workers=workers)
    replay(direct.path, "last", progress=False, reference_cache="off")
    return Run(cached.path), Run(direct.path)


@pytest.mark.parametrize("cfg", [
    tiny_config(epochs=3, optim={"name": "momentum", "lr": 0.1}),
    {**tiny_config(epochs=2, batch_size=40, checkpoint_every=2),
     "data": {"name": "mnist1d", "num_samples": 300, "n_train": 200, "n_test": 50},
     "model": {"name": "cnn1d", "width": 0.125, "norm": "none"}},
], ids=["mlp-digits", "cnn1d-mnist1d"])
def test_cached_equals_the_per_batch_reference_pass_bit_for_bit(tmp_path, cfg):
    cached, direct = _both(tmp_path, cfg)
    a = cached.store.read_shards("analysis/last/steps")
    b = direct.store.read_shards("analysis/last/steps")
    assert a[COLUMNS].equals(b[COLUMNS])  # every column, every bit
    sa = cached.store.read_shards("analysis/last/samples")
    sb = direct.store.read_shards("analysis/last/samples")
    assert sa.equals(sb)
    record = cached.store.read_json("analysis/last/reference_cache.json")
    assert record["mode"] == "cached" and record["max_dev"] == 0.0 and not record["flagged"]
    assert record["steps_checked"] == len(cached.store.files("analysis/last/reference_cache"))
    assert direct.store.read_json("analysis/last/reference_cache.json") == {
        "mode": "direct", "reason": "analysis.reference_cache is off", "complete": True}


MNIST1D = {"name": "mnist1d", "num_samples": 300, "n_train": 200, "n_test": 50}


@pytest.mark.parametrize("model, reason", [
    ({"name": "cnn1d", "width": 0.125, "norm": "all", "norm_type": "batch"},
     "batch norm '.*' normalises with the statistics of the batch in train mode"),
    ({"name": "cnn1d", "width": 0.125, "norm": "none"}, "analysis.reference_cache is off"),
], ids=["batchnorm", "opt-out"])
def test_cache_refused_where_the_loss_depends_on_the_batch(tmp_path, model, reason):
    cfg = {**tiny_config(batch_size=40), "data": MNIST1D, "model": model}
    if "batch" not in str(model):
        cfg["analysis"] = {"reference_cache": "off"}
    run = train_pass(cfg, tmp_path / "r", progress=False)
    replay(run.path, "last", progress=False)
    record = run.store.read_json("analysis/last/reference_cache.json")
    assert record["mode"] == "direct" and re.fullmatch(reason, record["reason"]), record
    assert not run.store.exists(f"analysis/last/{CACHE_FILE}")


def test_augmentation_refused():
    cfg = RunConfig.model_validate(tiny_config(data={"augment": "flip"}))
    assert why_not_cached(cfg, torch.nn.Linear(2, 2)) == "data augmentation 'flip' changes a sample at every visit"


def test_dropout_refused():
    cfg = RunConfig.model_validate(tiny_config())
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.1))
    assert why_not_cached(cfg, model) == "dropout '1' draws a new mask at every visit"
    assert why_not_cached(cfg, torch.nn.Sequential(torch.nn.Dropout(0.0))) is None


def test_a_planted_wrong_cached_value_is_caught(tmp_path):
    cfg = tiny_config(epochs=2)
    run = train_pass(cfg, tmp_path / "r", progress=False)
    sess = build_session(RunConfig.model_validate(cfg))
    saved = {"losses": reference_losses(sess, run.store.read_torch("final.pt")["model"]),
             "reference_sha256": run.meta.final_sha256, "batch_size": 32}
    # A sample in the first batch of epoch 1's segment, not in epoch 0's first batch.
    planted = sorted(set(sess.batches(1)[0].tolist()) - set(sess.batches(0)[0].tolist()))[0]
    saved["losses"][planted] += 1e-3  # off by far more than round-off
    run.store.write_torch(f"analysis/last/{CACHE_FILE}", saved)
    with pytest.raises(ReferenceCacheError, match=r"cached reference loss at step 3 .* the direct forward gives"):
        replay(run.path, "last", progress=False)


def test_switching_the_cache_off_replays_again(tmp_path):
    run = train_pass(tiny_config(epochs=2), tmp_path / "r", progress=False)
    replay(run.path, "last", progress=False)
    cached = run.store.read_shards("analysis/last/steps")
    assert run.store.read_json("analysis/last/reference_cache.json")["mode"] == "cached"
    replay(run.path, "last", progress=False, reference_cache="off")  # a new identity: every segment again
    assert run.store.read_json("analysis/last/reference_cache.json")["mode"] == "direct"
    assert run.store.files("analysis/last/reference_cache") == []
    assert run.store.read_shards("analysis/last/steps").equals(cached)
