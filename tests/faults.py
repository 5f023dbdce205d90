"""Helpers that cause real faults in tests: an encoder that holds a refresh back, actor process ids, and a
small or read-only filesystem."""

import os
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import ray
import torch


def gated_encoder_factory(real_factory, gate: str):
    """Wraps `callbacks_rag.encoder_factory`: the encoding actor's first step of a refresh (loading the
    weights) waits, for at most a minute, until the file `gate` exists."""

    def factory(encoder):
        build = real_factory(encoder)

        class Gated(torch.nn.Module):  # defined here, so Ray ships it to the actor by value
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def load_state_dict(self, state, *args, **kwargs):
                deadline = time.monotonic() + 60
                while not os.path.exists(gate) and time.monotonic() < deadline:
                    time.sleep(0.05)
                return self.inner.load_state_dict(state, *args, **kwargs)

            def forward(self, *args, **kwargs):
                return self.inner(*args, **kwargs)

        return lambda config: Gated(build(config))

    return factory


def kill_actors(module) -> None:
    """Kill a GenerativeQAModule's retrieval actors (tests build many modules in one Ray)."""
    for actor in module.retriever.actors:
        ray.kill(actor)


def actor_pid(actor) -> int:
    """The process id of a Ray actor (it must be free to answer)."""
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))


@contextmanager
def small_filesystem(path: Path, size: str = "64k", read_only: bool = False):
    """A tmpfs of `size` mounted at `path` (read-only if asked); the test is skipped where mounting is not
    allowed (not root, or no mount namespace)."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a Ray head or a DDP master)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
