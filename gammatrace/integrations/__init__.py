"""Where researchers train: PyTorch Lightning, the Hugging Face ``Trainer``, TensorBoard /
W&B logging, and ``torch.distributed`` (DDP, FSDP2).

Each framework is an optional extra (``pip install 'gammatrace[lightning]'``, ``[hf]``,
``[loggers]``); the modules below import it when they are imported, so import the one
you use (``import gammatrace`` imports none of them):

* :mod:`gammatrace.integrations.lightning` — a ``Callback`` and a verified two-pass ``fit``;
* :mod:`gammatrace.integrations.hf` — a ``TrainerCallback`` with its ``compute_loss`` hook,
  and a verified two-pass ``train``;
* :mod:`gammatrace.integrations.loggers` — the probe's columns to TensorBoard and W&B;
* :mod:`gammatrace.integrations.distributed` — the probe under DDP and FSDP2.

The two-pass helpers are :class:`gammatrace.TwoPass` run on the framework's own training:
they return its result and, with ``out=``, write a run folder (:func:`gammatrace.save_run`)
that ``gammatrace analyze`` and ``gammatrace report`` read.

Example:
    >>> import importlib.util
    >>> [m for m in ("loggers", "distributed", "lightning", "hf")
    ...  if importlib.util.find_spec(f"gammatrace.integrations.{m}") is None]
    []
"""
