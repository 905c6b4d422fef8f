"""XPSR's Table 1 numbers, and the table that sets a run beside them."""

from __future__ import annotations

import pytest

from xpsr_core.evaluation import paper
from xpsr_core.evaluation.evaluate import Report


def test_table1_holds_xpsrs_published_row_for_each_set():
    assert paper.TABLE1["RealSR"] == {"ssim": 0.6870, "lpips": 0.3517, "dists": 0.2471, "fid": 141.95,
                                      "maniqa": 0.6059, "clipiqa": 0.7354, "musiq": 70.23}
    assert paper.TABLE1["DRealSR"]["maniqa"] == 0.5713 and paper.TABLE1["DIV2K-Val"]["clipiqa"] == 0.7816
    assert all(set(row) <= set(paper.COLUMNS) for row in paper.TABLE1.values())


@pytest.mark.parametrize(("folder", "name"), [("RealSR", "RealSR"), ("drealsr", "DRealSR"), ("DIV2K_Val", "DIV2K-Val"),
                                              ("div2k val", "DIV2K-Val"), ("Set5", None)])
def test_sets_are_recognised_by_folder_name(folder: str, name: str | None):
    assert paper.paper_set(folder) == name


def test_a_set_the_paper_has_no_numbers_for_is_said_so_and_failures_are_named():
    report = Report(rows={"a": {"psnr": 20.0}})
    table = paper.comparison("Set5", report, [("b.png", "LoadImage: broken")])
    assert "| this run | 1 | 20.00 | n/a |" in table and "paper Table 1" not in table
    assert "- no paper numbers: 'Set5' is not one of Table 1's sets (RealSR, DRealSR, DIV2K-Val)" in table
    assert "- b.png not upscaled: LoadImage: broken" in table
