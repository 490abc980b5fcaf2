import pytest

from tests.evaluate import fakerun


@pytest.fixture(scope="session")
def built_root(tmp_path_factory, smollm2_dir):
    return fakerun.built(tmp_path_factory, smollm2_dir)


@pytest.fixture(scope="session")
def evaluated(tmp_path_factory, smollm2_dir):
    """(root, recipe): the evaluate stage ran once on a copy of the built run."""
    return fakerun.evaluated(tmp_path_factory, smollm2_dir)
