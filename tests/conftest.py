# TEMPORARY dev conftest (helper session) -- to be replaced by the real one
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["RAY_AUTH_MODE"] = "disabled"
os.environ["RAY_COLOR_PREFIX"] = "0"

import pytest  # noqa: E402
import ray  # noqa: E402

import distributed_ray_retriever  # noqa: E402


@pytest.fixture(scope="session")
def ray_local():
    distributed_ray_retriever.init_ray(None, "rag-tests")
    yield
    ray.shutdown()
