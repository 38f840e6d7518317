"""FLOPs per token, datasheet peaks, and the CPU peak probe."""

import jax
import pytest

from conftest import small_config
from gptjax import flops


def test_flops_per_token_follows_the_palm_formula():
    cfg = small_config("unused", "unused").model
    cfg.vocab_size = 65
    L, D, T, V = cfg.n_layer, cfg.n_embd, cfg.block_size, 65
    blocks = L * (12 * D * D + 4 * D)  # qkv, proj, fc, out; two LayerNorm scales
    n_params = blocks + V * D + T * D + D
    expected = 6 * (n_params - T * D) + 12 * L * D * T
    assert flops.flops_per_token(cfg, n_params, T * D) == expected
    cfg.tie_embeddings = False
    assert flops.flops_per_token(cfg, n_params + V * D, T * D) == expected  # lm_head counted once


@pytest.mark.parametrize("kind, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("Tesla T4", 65e12),
                                        ("NVIDIA L40S", 362e12), ("TPU v6 lite", 918e12)])
def test_datasheet_peaks_match_the_most_specific_name(kind, peak):
    assert flops.datasheet_peak(kind) == peak



def test_the_probe_keeps_the_fastest_of_probes_spread_over_time():
    # A shared machine: the second and fourth probes get the cores to themselves, the rest share them.
    durations = iter([4.0, 1.0, 3.0, 1.0, 5.0])
    now, slept = [0.0], []

    def clock():
        return now[0]

    def run_once():
        now[0] += next(durations)

    rate = flops.best_rate(run_once, flops=10.0, probes=5, calls=1, gap_s=0.5, clock=clock, sleep=slept.append)
    assert rate == 10.0  # 10 FLOPs in the quiet 1 s, not the mean or the first probe
    assert slept == [0.5] * 4  # spread out: one burst of other work cannot sink them all


def test_cpu_peak_is_measured_and_labelled_an_estimate():
    peak, source = flops.peak_flops(jax.devices("cpu"))
    assert peak > 0 and "estimate" in source and flops.is_estimate(source)
    assert not flops.is_estimate("datasheet bf16 (TPU v4)")
