"""Input checks: the mask value check can be trusted away by a caller that guarantees the range."""

from __future__ import annotations

import pytest
import torch

from models.input_checks import check_inpainting_inputs, mask_values_trusted
from pipeline.train.host_sync import count_host_reads


def test_the_mask_value_check_reads_the_device_once_and_names_the_range():
    image, mask = torch.rand(1, 3, 8, 8), torch.full((1, 1, 8, 8), 255.0)
    with count_host_reads() as reads, pytest.raises(ValueError, match=r"\[0,1\].*got \[255, 255\]"):
        check_inpainting_inputs(image, mask, size_multiple=4)
    assert reads.total == 1, reads.report()


def test_trusted_mask_values_cost_no_host_read_while_shape_rules_still_apply():
    image = torch.rand(1, 3, 8, 8)
    with mask_values_trusted(), count_host_reads() as reads:
        check_inpainting_inputs(image, torch.ones(1, 1, 8, 8), size_multiple=4)
        with pytest.raises(ValueError, match="1 channel"):
            check_inpainting_inputs(image, torch.ones(1, 3, 8, 8), size_multiple=4)
    assert reads.total == 0, reads.report()
    with pytest.raises(ValueError, match=r"\[0,1\]"):  # trust ends with the block
        check_inpainting_inputs(image, torch.full((1, 1, 8, 8), 2.0), size_multiple=4)
