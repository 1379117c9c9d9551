"""What the integration tests share: the rule for a missing optional framework.

An integration's framework is an optional extra; without it the test skips, saying how to
install it — except under ``CI=true``, where CI installs requirements-dev.txt, so a missing
package is a broken install and the test fails instead.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

EXTRAS = {"lightning": "lightning", "transformers": "hf", "accelerate": "hf", "tensorboard": "loggers",
          "wandb": "loggers"}


def need(module: str) -> ModuleType:
    """Import ``module``, or skip (fail under CI=true) with the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = EXTRAS.get(module.split(".")[0], module)
        msg = f"{module} is not installed ({exc}); pip install 'gammatrace[{extra}]'"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + " — CI installs requirements-dev.txt, so this is a broken install")
        pytest.skip(msg)


def test_a_missing_framework_skips_and_fails_under_ci(monkeypatch):
    monkeypatch.setenv("CI", "false")
    with pytest.raises(pytest.skip.Exception, match=r"gammatrace\[loggers\]"):
        need("wandb.no_such_module_here")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="broken install"):
        need("wandb.no_such_module_here")
    assert need("torch").__name__ == "torch"
