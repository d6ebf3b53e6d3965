"""Shared pytest configuration.

- Marker ``cuda``: tests that need a CUDA device; skipped when
  ``torch.cuda.is_available()`` is false (or torch is missing).
- Hypothesis profiles: ``ci`` (default: no deadline, 25 examples) and ``long``
  (500 examples); pick one with the environment variable ``HYPOTHESIS_PROFILE``.
"""

from __future__ import annotations

import os

import pytest

try:
    from hypothesis import settings
except ImportError:  # hypothesis is only needed by the property tests
    settings = None

if settings is not None:
    settings.register_profile("ci", deadline=None, max_examples=25)
    settings.register_profile("long", deadline=None, max_examples=500)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "cuda: test needs a CUDA device (skipped without one)")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cuda_items = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not cuda_items or _cuda_available():  # import torch only when it matters
        return
    skip = pytest.mark.skip(reason="CUDA is not available (torch.cuda.is_available() is false)")
    for item in cuda_items:
        item.add_marker(skip)
