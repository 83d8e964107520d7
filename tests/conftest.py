import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random

import pytest
from PIL import Image

from cafe.tiny import build_tiny_checkpoint

WORDS = ("a the red green blue yellow circle square triangle star small large top bottom left right center "
         "is there in image yes no how many shapes").split()


def tiny_corpus(n: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "model", tiny_corpus())


def random_image(rng: random.Random, width: int, height: int) -> Image.Image:
    img = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(3):
        x, y = rng.randrange(width), rng.randrange(height)
        img.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, min(width, x + 20), min(height, y + 20)))
    return img


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    if started:
        ray.shutdown()
