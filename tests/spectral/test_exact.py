"""exact.py against the plain float64 two-SVD reference (tests.helpers.reference_intruders)."""

import pytest
import torch

from lora_audit.spectral.exact import base_spectrum, exact_topk
from tests.helpers import reference_intruders
from tests.spectral.reference import intruder_case


@pytest.mark.parametrize("shape", [(40, 40), (64, 24), (24, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_topk_equals_reference(shape, dtype):
    g = torch.Generator().manual_seed(1)
    W0 = torch.randn(*shape, generator=g)
    W1 = W0 + 0.8 * torch.randn(shape[0], 3, generator=g) @ torch.randn(3, shape[1], generator=g)
    ref_cos, ref_count = reference_intruders(W0.double(), W1.double(), k=10, epsilon=0.5)
    top = exact_topk(base_spectrum(W0.to(dtype)), W1.to(dtype), 10)
    assert top.method == "exact"
    assert top.max_cos.dtype == dtype
    assert top.max_cos.tolist() == pytest.approx(ref_cos, abs=1e-4)
    assert int((top.max_cos < 0.5).sum()) == ref_count
    # argmax is the base vector achieving the max; its |cos| is the reported value
    assert torch.allclose(top.base_coords.abs().gather(0, top.argmax_base[None]).squeeze(0), top.max_cos)
    # singular values of W1, descending
    assert top.singular_values.tolist() == pytest.approx(torch.linalg.svdvals(W1.double())[:10].tolist(), rel=1e-4)


def test_constructed_intruder_found_and_located():
    W0, u, v, s = intruder_case(48, 40)
    W1 = W0 + s * u @ v
    ref_cos, ref_count = reference_intruders(W0, W1, k=10, epsilon=0.5)
    top = exact_topk(base_spectrum(W0.float()), W1.float(), 10)
    assert ref_count >= 1 and int((top.max_cos < 0.5).sum()) == ref_count
    # the intruder is the top direction (rank position 0), with |cos| close to 1/sqrt(40)
    assert top.max_cos[0].item() < 0.5
    assert top.max_cos[0].item() == pytest.approx(40 ** -0.5, abs=0.05)
    assert top.max_cos.tolist() == pytest.approx(ref_cos, abs=1e-4)


def test_small_update_has_no_intruders():
    g = torch.Generator().manual_seed(2)
    W0 = torch.randn(50, 30, generator=g)
    W1 = W0 + 1e-3 * torch.randn(50, 30, generator=g)
    _, ref_count = reference_intruders(W0, W1)
    top = exact_topk(base_spectrum(W0), W1, 10)
    assert ref_count == 0 and int((top.max_cos < 0.5).sum()) == 0
    assert top.max_cos.min().item() > 0.9


def test_k_larger_than_rank_is_clipped_and_bad_input_refused():
    W0 = torch.randn(6, 4)
    top = exact_topk(base_spectrum(W0), W0 + 1.0, 10)
    assert top.max_cos.shape == (4,)
    with pytest.raises(ValueError, match="shape"):
        exact_topk(base_spectrum(W0), torch.randn(4, 6), 3)
    with pytest.raises(ValueError, match="k must be"):
        exact_topk(base_spectrum(W0), W0, 0)
    # half precision is upcast, never fed to the SVD
    assert base_spectrum(W0.half()).U.dtype == torch.float32
