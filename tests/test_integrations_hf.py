"""The Hugging Face Trainer integration (gammatrace.integrations.hf) on a tiny randomly
initialised 2-layer GPT-2 built from a config — nothing is ever downloaded.

First a plain loop is shown to reproduce the Trainer's trajectory bit for bit (AdamW with
no decay on biases and LayerNorm, linear warm-up, max_grad_norm, gradient accumulation,
dropout); then the probed Trainer is shown to train that same trajectory, and its γ to equal
the plain loop's probe on the same data order to float64 round-off; then the two-pass
``train`` writes a run folder that ``gammatrace analyze`` and ``report`` read.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import pytest
import torch

from tests.test_integrations_support import need

os.environ["HF_HUB_OFFLINE"] = "1"  # no download, ever
transformers = need("transformers")
need("accelerate")

from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

import gammatrace  # noqa: E402
from gammatrace.integrations import hf  # noqa: E402

SEED = 0
STEPS_PER_EPOCH, EPOCHS = 3, 2  # 24 sequences, 4 per micro-batch, 2 micro-batches per step
TOKENS = torch.randint(0, 48, (24, 12), generator=torch.Generator().manual_seed(1))
DATA = [{"input_ids": t, "labels": t} for t in TOKENS]
CONFIG = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=48, n_positions=12, bos_token_id=0,
                    eos_token_id=0)  # dropout 0.1 everywhere: the probe must replay the masks


def make_model() -> GPT2LMHeadModel:
    model = GPT2LMHeadModel(CONFIG)
    model.loss_type = "ForCausalLM"  # the Trainer then counts the shifted targets (see hf's docstring)
    return model


def make_trainer(record: list | None = None) -> Trainer:
    args = TrainingArguments(tempfile.mkdtemp(), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             num_train_epochs=EPOCHS, learning_rate=3e-3, weight_decay=0.1, warmup_steps=2,
                             max_grad_norm=0.5, lr_scheduler_type="linear", seed=SEED, report_to="none",
                             use_cpu=True, save_strategy="no", logging_strategy="no", disable_tqdm=True,
                             log_level="error")
    trainer = Trainer(model=make_model(), args=args, train_dataset=DATA)
    trainer.remove_callback(transformers.PrinterCallback)
    if record is not None:  # the micro-batches, in the order the Trainer saw them (no RNG touched)
        original = trainer.compute_loss

        def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                record.append(({k: v.clone() for k, v in inputs.items()}, num_items_in_batch))
            return original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

        trainer.compute_loss = compute_loss
    return trainer


def fit(trainer: Trainer) -> dict[str, torch.Tensor]:
    transformers.set_seed(SEED)
    trainer.train()
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def built(record: list | None = None, callback: hf.GammaTrace | None = None) -> Trainer:
    transformers.set_seed(SEED)  # the model's initialisation
    trainer = make_trainer(record)
    if callback is not None:
        callback.attach(trainer)
    return trainer


def plain_loop(micro: list, probe_reference: dict | None = None):
    """What the Trainer does, written out: returns (θ_T, the probe or None)."""
    transformers.set_seed(SEED)
    model = make_model()
    transformers.set_seed(SEED)  # Trainer.__init__ seeds again, after the model exists
    decay = [n for n, _ in model.named_parameters() if "bias" not in n and ".ln_" not in n and "ln_f" not in n]
    groups = [{"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": 0.1},
              {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=3e-3, betas=(0.9, 0.999), eps=1e-8, fused=True)
    sched = transformers.get_linear_schedule_with_warmup(opt, 2, STEPS_PER_EPOCH * EPOCHS)
    probe = None
    if probe_reference is not None:
        def loss_fn(m, b):
            return hf.token_losses(m(input_ids=b["input_ids"]).logits, b["labels"], shift=True)
        probe = gammatrace.Probe(model, opt, loss_fn, reference=probe_reference)
    model.train()
    for epoch in range(EPOCHS):
        torch.empty((), dtype=torch.int64).random_()  # RandomSampler draws its seed from the global stream
        for s in range(STEPS_PER_EPOCH):
            for inputs, n_items in micro[(epoch * STEPS_PER_EPOCH + s) * 2:][:2]:
                out = model(**inputs, num_items_in_batch=n_items)
                out.loss.backward()
                if probe is not None:
                    probe.batch(inputs, hf.token_losses(out.logits.detach(), inputs["labels"], shift=True))
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            sched.step()
            model.zero_grad()
        if probe is not None:
            probe.end_epoch()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, probe


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"differ: {bad[:4]}"


@pytest.fixture(scope="module")
def trainer_run():
    micro: list = []
    final = fit(built(micro))
    return micro, final


def test_the_plain_loop_reproduces_the_trainer_bit_for_bit(trainer_run):
    micro, final = trainer_run
    assert len(micro) == 2 * STEPS_PER_EPOCH * EPOCHS
    plain, _ = plain_loop(micro)
    assert_same(final, plain)


def test_probed_trainer_is_the_same_trajectory_and_gamma_matches_the_plain_loop(trainer_run, tmp_path):
    micro, final = trainer_run
    result = hf.train(built, seed=SEED, threads=1, out=tmp_path / "gpt2")  # pass 1 + verified pass 2
    assert_same(final, {k: result.theta_T[k] for k in final})  # probing changed nothing
    run = gammatrace.load_run(tmp_path / "gpt2")
    assert len(run.steps()) == STEPS_PER_EPOCH * EPOCHS and run.status.value == "complete"

    _, probe = plain_loop(micro, probe_reference=result.theta_T)
    ours, theirs = result.steps(), probe.steps()
    assert ours["loss"].tolist() == theirs["loss"].tolist()  # the same ℓ_k, bit for bit
    for col in ("loss_ref", "progress", "dist_sq", "update_sq", "grad_dot", "gamma", "gamma_rp", "cos_align"):
        np.testing.assert_allclose(ours[col], theirs[col], rtol=1e-12, atol=1e-15, err_msg=col)
    assert ours["lr"].iloc[0] == 0.0 and np.isnan(ours["gamma"].iloc[0])  # warm-up from 0: γ_0 undefined
    np.testing.assert_allclose(run.steps()["gamma"], ours["gamma"], rtol=1e-12)

    # The folder is a gammatrace run: the command line analyses and reports it.
    from gammatrace.cli import main

    assert main(["analyze", str(tmp_path / "gpt2"), "--quiet"]) == 0
    assert main(["report", str(tmp_path / "gpt2"), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report").is_dir()


def test_a_changed_pass_two_is_refused(tmp_path):
    calls = []

    def build():
        trainer = built()
        calls.append(1)
        if len(calls) == 2:
            trainer.args.learning_rate = 3.1e-3  # another schedule: step 1 (the warm-up starts at 0)
        return trainer

    with pytest.raises(gammatrace.engine.ReplayMismatchError, match=r"pass 2 diverged from pass 1 at step 1 \(epoch 0\): lr"):
        hf.train(build, seed=SEED, threads=1)


def test_a_callback_that_was_not_attached_says_how(tmp_path):
    trainer = built()
    trainer.add_callback(hf.GammaTrace())
    with pytest.raises(hf.IntegrationError, match=r"attach\(trainer\)"):
        trainer.train()


def test_token_losses_match_the_models_own_loss():
    transformers.set_seed(SEED)
    model = make_model().eval()
    batch = DATA[0]["input_ids"][None]
    out = model(input_ids=batch, labels=batch)
    assert torch.allclose(hf.token_losses(out.logits, batch, shift=True).mean(), out.loss, rtol=1e-6)


def test_attach_returns_a_handle_that_detaches(tmp_path):
    """``attach`` wraps ``compute_loss``; its handle's ``detach`` (or its ``with`` block)
    restores the Trainer's own and removes the callback; so does the end of training."""
    trainer = built()
    own = trainer.compute_loss
    callback = hf.GammaTrace()
    handle = callback.attach(trainer)
    assert trainer.compute_loss != own and callback in trainer.callback_handler.callbacks
    handle.detach()
    assert trainer.compute_loss == own and "compute_loss" not in vars(trainer)
    assert callback not in trainer.callback_handler.callbacks
    handle.detach()  # twice is harmless

    record: list = []
    trainer = built(record)  # an instance attribute of its own: kept, and given back
    own = trainer.compute_loss
    with hf.GammaTrace().attach(trainer) as handle:
        assert trainer.compute_loss is not own and handle.trainer is trainer
    assert trainer.compute_loss is own

    trainer = built()
    callback = hf.GammaTrace(out=tmp_path / "one")
    callback.attach(trainer)
    trainer.train()  # the end of training gives compute_loss back
    assert "compute_loss" not in vars(trainer) and len(callback.steps()) == STEPS_PER_EPOCH * EPOCHS
    assert gammatrace.load_run(tmp_path / "one").status.value == "trained"  # record mode: no θ* yet
