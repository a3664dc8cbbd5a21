import atexit
import lzma
import os
import shutil
import tempfile

import pytest
import torch

from prepare import DATASETS, LLAMA2_PATH


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and lose several-fold when another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


_unpacked = None


def unpacked_assets():
    """A temporary folder with the shipped llama2_tokenizer.model and tinyshakespeare.txt (unpacked from
    assets/tinyshakespeare.txt.xz), for a test that names the plain text file; removed at exit."""
    global _unpacked
    if _unpacked is None:
        _unpacked = tempfile.mkdtemp(prefix="assets_")
        atexit.register(shutil.rmtree, _unpacked, ignore_errors=True)
        shutil.copy(LLAMA2_PATH, _unpacked)
        with lzma.open(DATASETS["tinyshakespeare"]["path"]) as src, \
                open(os.path.join(_unpacked, "tinyshakespeare.txt"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    return _unpacked
