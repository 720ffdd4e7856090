"""The reader's tests use the data_prep fixtures: a tiny synthetic COCO set and its packed shards."""
from tests.data_prep.conftest import TinyCoco, packed_dir, tiny_coco  # noqa: F401 - pytest fixtures

__all__ = ["TinyCoco", "packed_dir", "tiny_coco"]
