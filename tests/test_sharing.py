"""Jobs sharing one machine: parallel jobs take disjoint slots (their GPU, their share of the
CPU threads), one process downloads a dataset while the others wait, and jobs run one after
another in one process do not inherit each other's torch settings."""

import threading
import time
from types import SimpleNamespace

import pytest
import torch

from resnet_lab import sharing
from resnet_lab.data import sources
from tests.launch import multirun


def test_parallel_jobs_take_the_lowest_free_slots(tmp_path):
    with sharing.slot(tmp_path, 3) as first, sharing.slot(tmp_path, 3) as second:
        assert (first, second) == (0, 1)
        with sharing.slot(tmp_path, 3) as third:
            assert third == 2
    with sharing.slot(tmp_path, 3) as again:
        assert again == 0  # released when its job ended


def test_a_parallel_job_gets_its_share_of_the_cpu_threads(monkeypatch):
    monkeypatch.setattr(sharing, "cores", lambda: 8)
    with sharing.torch_state():
        assert sharing.place(1, 4, "cpu") == "parallel job slot 1 of 4 on this machine: 2 CPU threads"
        assert torch.get_num_threads() == 2
        sharing.place(0, 16, "cpu")
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 1  # the suite's own setting, restored


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA GPU")
def test_a_parallel_job_takes_the_gpu_of_its_slot():
    gpus = torch.cuda.device_count()
    with sharing.torch_state():
        line = sharing.place(gpus, gpus + 1, "cuda")
        assert torch.cuda.current_device() == 0 and f"GPU 0 of {gpus}, shared by 2 jobs" in line
        if gpus > 1:
            sharing.place(1, gpus, "auto")
            assert torch.cuda.current_device() == 1


def test_jobs_in_one_process_do_not_inherit_a_deterministic_setting(tmp_path, fmnist_root):
    torch.use_deterministic_algorithms(False)  # whatever an earlier test's direct train() call left
    code, sweep, _ = multirun(tmp_path, fmnist_root, "trainer.deterministic=true,false")
    assert code == 0 and (sweep / "1" / "metrics.jsonl").is_file()
    assert not torch.are_deterministic_algorithms_enabled()


def test_processes_that_need_one_dataset_download_it_once(tmp_path):
    folder = tmp_path / "Fake" / "raw"
    downloads = []

    class Fake:
        def __init__(self, root, train, download):
            downloads.append(threading.get_ident())
            time.sleep(0.3)  # long enough for the other caller to arrive while this one downloads
            folder.mkdir(parents=True)
            (folder / "data").write_bytes(b"x")

    cfg = SimpleNamespace(download=True, root=str(tmp_path))
    callers = [threading.Thread(target=sources._fetch, args=(Fake, cfg, str(folder), ["data"])) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(downloads) == 1 and (folder / "data").read_bytes() == b"x"
