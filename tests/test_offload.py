"""Offloading: saved activations moved to the host give bit-identical gradients."""

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from lowbit.offload import offload_activations


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).train()


def _grads(model, ids, offload=None, ckpt=False):
    model.zero_grad(set_to_none=True)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    if offload is not None:
        with offload:
            loss = model(ids, labels=ids).loss
    else:
        loss = model(ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("ckpt", [False, True])
def test_gradients_bit_identical_with_offloading(ckpt):
    model = _tiny()
    ids = torch.randint(0, 256, (2, 48))
    loss0, g0 = _grads(model, ids, ckpt=ckpt)
    off = offload_activations(min_bytes=1024)
    loss1, g1 = _grads(model, ids, off, ckpt=ckpt)
    assert torch.equal(loss0, loss1)
    assert g0.keys() == g1.keys() and all(torch.equal(g0[k], g1[k]) for k in g0)
    assert off.stats.tensors > 0 and off.stats.restored == off.stats.tensors
    assert off.stats.bytes > 0


def test_checkpointing_leaves_less_to_offload():
    model = _tiny()
    ids = torch.randint(0, 256, (2, 48))
    plain, ck = offload_activations(min_bytes=1024), offload_activations(min_bytes=1024)
    _grads(model, ids, plain)
    _grads(model, ids, ck, ckpt=True)
    assert 0 < ck.stats.bytes < plain.stats.bytes


def test_small_tensors_and_parameters_stay():
    w = torch.nn.Parameter(torch.randn(8, 8))
    x = torch.randn(4, 8, requires_grad=True)
    off = offload_activations(min_bytes=1 << 20)
    with off:
        y = (x @ w).sum()
    y.backward()
    assert off.stats.tensors == 0 and off.stats.kept >= 2
    with pytest.raises(ValueError):
        offload_activations(max_in_flight=0)
