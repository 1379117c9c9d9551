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
    assert torch.allclose(hf.token_losses(out.logits, batch, shift=True).mean(), out.loss.double(), rtol=1e-6)


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


# ------------------------------------------------------------------ the objective the Trainer differentiates
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

BERT = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                  max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0,
                  attention_probs_dropout_prob=0.0)  # no dropout: the brute force re-evaluates plainly


def bert_trainer(n: int, record: list, accepts: bool | None = None) -> Trainer:
    """A tiny BERT classifier (it takes **kwargs and ignores num_items_in_batch), accumulation 2,
    no clipping; ``record`` gets, per training micro-batch: its inputs, the Trainer's global
    step, current_gradient_accumulation_steps, θ (the parameters as the step starts) and the
    loss the Trainer computed."""
    transformers.set_seed(SEED)
    g = torch.Generator().manual_seed(2)
    data = [{"input_ids": t, "labels": y} for t, y in zip(torch.randint(0, 40, (n, 8), generator=g),
                                                         torch.randint(0, 3, (n,), generator=g), strict=True)]
    args = TrainingArguments(tempfile.mkdtemp(), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             num_train_epochs=2, learning_rate=1e-2, max_grad_norm=0.0, lr_scheduler_type="constant",
                             seed=SEED, report_to="none", use_cpu=True, save_strategy="no", logging_strategy="no",
                             disable_tqdm=True, log_level="error")
    trainer = Trainer(model=BertForSequenceClassification(BERT), args=args, train_dataset=data)
    trainer.remove_callback(transformers.PrinterCallback)
    if accepts is not None:
        trainer.model_accepts_loss_kwargs = accepts
    record.clear()
    original = trainer.compute_loss

    def compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
        out = original(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if model.training:
            loss = out[0] if return_outputs else out
            record.append({"inputs": {k: v.clone() for k, v in inputs.items()}, "step": trainer.state.global_step,
                           "M": trainer.current_gradient_accumulation_steps, "loss": loss.detach().double(),
                           "theta": {k: v.detach().clone() for k, v in model.named_parameters()}})
        return out

    trainer.compute_loss = compute_loss
    return trainer


def by_step(record: list) -> list[list[dict]]:
    steps: dict[int, list] = {}
    for mb in record:
        steps.setdefault(mb["step"], []).append(mb)
    return [steps[k] for k in sorted(steps)]


@pytest.mark.parametrize("n, accepts, divided", [(23, None, False),   # ragged last micro-batch (4, 3)
                                                  (19, None, False),   # an epoch's last step has 1 micro-batch
                                                  (23, False, True)])  # no loss kwargs: the Trainer divides by M
def test_hf_loss_is_the_objective_the_trainer_differentiates(n, accepts, divided):
    """Issue 21 item 2: BERT takes **kwargs but ignores num_items_in_batch, so the Trainer does not
    divide: the step follows ∇(sum of the micro-batch means); without loss kwargs it divides each
    by current_gradient_accumulation_steps. ℓ_k is that objective, in float64."""
    record: list = []
    trainer = bert_trainer(n, record, accepts)
    callback = hf.GammaTrace()
    callback.attach(trainer)
    trainer.train()
    ours = callback.steps()["loss"].to_numpy()
    groups = by_step(record)
    assert len(groups) == len(ours) and {len(g) for g in groups} >= ({1, 2} if n == 19 else {2})
    expected = []
    for g in groups:
        assert g[0]["M"] == len(g)
        expected.append(sum(mb["loss"] for mb in g) / (len(g) if divided else 1))
    np.testing.assert_allclose(ours, torch.stack(expected).numpy(), rtol=1e-14, atol=0)
    if not divided:  # the sum of the means, not their sample-weighted mean
        assert not np.allclose(ours[0], float(torch.stack([mb["loss"] for mb in groups[0]]).mean()))


def test_hf_two_pass_measures_bert_against_a_brute_force():
    """Issue 21 item 2: ℓ_k, ℓ(θ*; B_k), ‖g_k‖² and γ_k of a BERT classifier with accumulation 2,
    each recomputed from the stored θ_k and θ* in float64 (DESIGN §1)."""
    record: list = []
    result = hf.train(lambda: bert_trainer(23, record), seed=SEED, threads=1)
    steps = result.steps()
    groups = by_step(record)  # the last pass's micro-batches
    model = BertForSequenceClassification(BERT).eval()
    names = [n for n, _ in model.named_parameters()]

    def objective(theta, group, grad=False):
        model.load_state_dict({**model.state_dict(), **theta})
        model.zero_grad()
        with torch.set_grad_enabled(grad):
            total = sum(model(**mb["inputs"]).loss for mb in group)  # the Trainer's: not divided
        if grad:
            total.backward()
            return float(total.detach()), sum(float(p.grad.double().pow(2).sum()) for p in model.parameters())
        return float(total)

    theta = [g[0]["theta"] for g in groups] + [{k: result.theta_T[k] for k in names}]
    d_sq = [sum(float((t[k].double() - result.theta_T[k].double()).pow(2).sum()) for k in names) for t in theta]
    for k, group in enumerate(groups):
        loss, grad_sq = objective(theta[k], group, grad=True)
        loss_ref = objective(theta[-1], group)
        np.testing.assert_allclose(steps["loss"].iloc[k], loss, rtol=1e-6)
        np.testing.assert_allclose(steps["loss_ref"].iloc[k], loss_ref, rtol=1e-6)
        np.testing.assert_allclose(steps["grad_sq"].iloc[k], grad_sq, rtol=1e-4)
        progress = 0.5 * (d_sq[k] - d_sq[k + 1])
        gamma = progress / (steps["lr"].iloc[k] * d_sq[0] * (loss - loss_ref))
        np.testing.assert_allclose(steps["gamma"].iloc[k], gamma, rtol=1e-4)


def test_a_model_that_divides_by_num_items_but_not_as_token_cross_entropy_is_refused():
    """Issue 21 item 2: a loss that uses num_items_in_batch (measured) but is not the tokens'
    cross-entropy cannot be re-evaluated: refused in one line, saying why."""
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(48, 48)

        def forward(self, input_ids, labels=None, num_items_in_batch=None, **kwargs):
            logits = self.emb(input_ids)
            loss = logits.logsumexp(-1).sum() / (num_items_in_batch if num_items_in_batch is not None else 1)
            return {"loss": loss, "logits": logits}

    args = TrainingArguments(tempfile.mkdtemp(), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             num_train_epochs=1, report_to="none", use_cpu=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, log_level="error")
    trainer = Trainer(model=Odd(), args=args, train_dataset=DATA)
    trainer.remove_callback(transformers.PrinterCallback)
    hf.GammaTrace().attach(trainer)
    with pytest.raises(hf.IntegrationError, match=r"divides its loss by num_items_in_batch, but not as the token "
                                                  r"cross-entropy") as err:
        trainer.train()
    assert "\n" not in str(err.value)


def test_a_taken_output_folder_is_refused_before_training(tmp_path):
    """Issue 21 item 9: the folder is checked before pass 1, not after both passes."""
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "run.json").write_text("{}")
    with pytest.raises(gammatrace.engine.RunConflictError, match="already holds a run"):
        hf.train(lambda: pytest.fail("built before the folder was checked"), seed=SEED, out=tmp_path / "taken")
