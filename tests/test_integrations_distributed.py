"""The probe under torch.distributed (gammatrace.integrations.distributed): two processes on
127.0.0.1 over gloo, DDP and FSDP2 (``fully_shard`` on a CPU device mesh).

For each: the two-rank run equals, bit for bit, one process accumulating gradients over the
same two per-rank micro-batches (each loss ÷ 2); pass 2 (against θ_T) repeats pass 1's losses
bit for bit; the probe's columns equal a brute force on the distributed run's own stored
iterates to float64 round-off; under FSDP2 each rank's probe holds only its shards.

The spawned ranks put their results on a queue before they exit, and the test reads them
with a timeout before joining (a harness that waits for exit first was seen to hang at
teardown).
"""

from __future__ import annotations

import pickle
import socket
import traceback

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import gammatrace
from gammatrace.integrations import distributed as D

WORLD, STEPS, BATCH = 2, 6, 4
KERNEL = "torch"  # the fused kernel is the default on CPU; compiling it would cost each rank seconds


def make() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def micro_batch(step: int, rank: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(BATCH, 5, generator=g), torch.randint(0, 3, (BATCH,), generator=g)


def optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=0.05)


# ----------------------------------------------------------------------------- the ranks
def _wrap(kind: str, model: nn.Module) -> nn.Module:
    if kind == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _train(kind: str, rank: int, reference=None) -> dict:
    model = _wrap(kind, make())
    opt = optimizer(model)
    ref_model = _wrap(kind, make()) if reference is not None and kind == "fsdp" else None
    probe = D.DistributedProbe(model, opt, loss_fn, reference=reference, reference_model=ref_model, kernel=KERNEL)
    iterates = [D.full_state(model)]
    for k in range(STEPS):
        batch = micro_batch(k, rank)
        opt.zero_grad()
        loss = loss_fn(model, batch)
        loss.backward()
        probe.batch(batch, loss)
        opt.step()
        iterates.append(D.full_state(model))  # a collective under FSDP2
    steps, tensors, _ = probe.take()
    out = {"steps": steps, "tensors": tensors, "iterates": iterates, "local": probe.local_numel(),
           "bound": D.shard_bound(model), "kernel_bytes": probe.probe.kernel.nbytes()}
    probe.close()
    return out


def _job(rank: int) -> dict:
    results = {}
    for kind in ("ddp", "fsdp"):
        first = _train(kind, rank)
        second = _train(kind, rank, reference=first["iterates"][-1])
        results[kind] = {"record": first["steps"], "measured": second["steps"], "tensors": second["tensors"],
                         "iterates": first["iterates"], "iterates2": second["iterates"],
                         "local": second["local"], "bound": second["bound"], "kernel_bytes": second["kernel_bytes"]}
    return results


def _rank(rank: int, port: int, queue) -> None:
    import torch.distributed as dist

    try:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
        # Pickled to bytes here: a tensor sent as is travels as shared memory that vanishes
        # with this process, which exits right after.
        queue.put((rank, pickle.dumps(_job(rank)), None))
    except BaseException:  # the parent must hear about it, not wait for a timeout
        queue.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(timeout: float = 240.0) -> dict[int, dict]:
    """Run the job on WORLD processes; results by rank, read before the processes are joined."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, port, queue), daemon=True) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        results: dict[int, dict] = {}
        for _ in range(WORLD):
            rank, result, error = queue.get(timeout=timeout)
            assert error is None, f"rank {rank} failed:\n{error}"
            results[rank] = pickle.loads(result)
        return results
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()


@pytest.fixture(scope="module")
def ranks() -> dict[int, dict]:
    return spawn()


# ----------------------------------------------------------------------------- the checks
def one_process(reference: dict | None):
    """One process accumulating over the two ranks' micro-batches, each loss ÷ 2."""
    model = make()
    opt = optimizer(model)
    probe = gammatrace.Probe(model, opt, loss_fn, reference=reference)
    iterates = [{k: v.detach().clone() for k, v in model.state_dict().items()}]
    for k in range(STEPS):
        opt.zero_grad()
        for r in range(WORLD):
            batch = micro_batch(k, r)
            loss = loss_fn(model, batch)
            (loss / WORLD).backward()
            probe.batch(batch, loss)
        opt.step()
        iterates.append({n: v.detach().clone() for n, v in model.state_dict().items()})
    return iterates, probe.steps()


def brute_force(iterates: list[dict], reference: dict) -> dict[str, np.ndarray]:
    flat = lambda s: torch.cat([s[n].double().reshape(-1) for n in sorted(reference)])  # noqa: E731
    theta, star = [flat(s) for s in iterates], flat(reference)
    e = [t - star for t in theta[:-1]]
    delta = [a - b for a, b in zip(theta[:-1], theta[1:], strict=True)]
    return {"dist_sq": np.array([float(x @ x) for x in e]), "update_sq": np.array([float(d @ d) for d in delta]),
            "progress": np.array([float(x @ d) - 0.5 * float(d @ d) for x, d in zip(e, delta, strict=True)])}


@pytest.mark.parametrize("kind", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process_accumulating(ranks, kind):
    got = ranks[0][kind]
    theta_t = got["iterates"][-1]
    single, single_steps = one_process(theta_t)
    for k, (a, b) in enumerate(zip(got["iterates"], single, strict=True)):  # bit for bit, every step
        assert all(torch.equal(a[n], b[n]) for n in b), f"step {k} differs"
    assert all(torch.equal(a[n], b[n]) for a, b in zip(ranks[1][kind]["iterates"], single, strict=True) for n in b)

    measured = got["measured"]
    np.testing.assert_array_equal(got["record"]["loss"], measured["loss"])  # pass 2 repeats pass 1
    np.testing.assert_allclose(measured["loss"], single_steps["loss"], rtol=1e-15)  # mean of the rank means
    np.testing.assert_allclose(measured["loss_ref"], single_steps["loss_ref"], rtol=1e-15)
    for col in ("progress", "dist_sq", "update_sq", "grad_dot", "grad_sq"):
        np.testing.assert_allclose(measured[col], single_steps[col], rtol=1e-12, atol=1e-15, err_msg=col)
    brute = brute_force(got["iterates"], theta_t)
    for col, values in brute.items():
        np.testing.assert_allclose(measured[col], values, rtol=1e-12, atol=1e-15, err_msg=col)
    # every rank has the full-vector values
    for col in ("loss", "progress", "dist_sq", "grad_dot"):
        np.testing.assert_array_equal(ranks[1][kind]["measured"][col], measured[col])
    # per-tensor progress sums to the step's progress, under the model's own names
    tensors = got["tensors"]
    assert set(tensors["tensor"]) == set(theta_t)
    np.testing.assert_allclose(tensors.groupby("step")["progress"].sum(), measured["progress"], rtol=1e-10)


def test_fsdp_ranks_hold_only_their_shards(ranks):
    d = sum(v.numel() for v in make().parameters())
    for r in range(WORLD):
        got = ranks[r]["fsdp"]
        assert got["local"] <= got["bound"] < d  # each tensor's rows split over the ranks
        assert got["kernel_bytes"] <= 4 * 8 * got["bound"]  # the torch kernel: 3 float64 rows and θ* (shards)
    assert ranks[0]["ddp"]["local"] == d  # DDP: every rank holds all of θ
