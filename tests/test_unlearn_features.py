"""Layer capture (with early stop) and feature pooling for CLReg/RMU."""
import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from clreg_fast.unlearn.train import _enable_checkpointing  # noqa: E402
from clreg_fast.unlearn.features import (capture_layer, decoder_layers, layer_hidden_states,  # noqa: E402
                                         pool_features, resolve_layer)


def tiny(layers=4, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24,
                                        num_hidden_layers=layers, num_attention_heads=2,
                                        num_key_value_heads=1, max_position_embeddings=32))


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (3, 7), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 5:] = 0
    return ids, mask


def test_decoder_layers_and_resolve():
    model = tiny()
    assert decoder_layers(model) is model.model.layers
    assert resolve_layer(model, -1) == 3 and resolve_layer(model, 1) == 1
    assert resolve_layer(model, 7, clamp=True) == 3
    with pytest.raises(ValueError, match="out of range"):
        resolve_layer(model, 4)
    with pytest.raises(ValueError, match="out of range"):
        resolve_layer(model, -5)
    with pytest.raises(TypeError):
        resolve_layer(model, 1.0)


@pytest.mark.parametrize("layer", [0, 2])
def test_capture_matches_output_hidden_states(layer):
    model = tiny().eval()
    ids, mask = batch()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        with capture_layer(model, layer) as cap:
            out = cap.run(input_ids=ids, attention_mask=mask)
    # hidden_states[0] is the embedding output, hidden_states[i + 1] the output of layer i.
    torch.testing.assert_close(cap[layer], full.hidden_states[layer + 1], rtol=0, atol=0)
    torch.testing.assert_close(out.logits, full.logits, rtol=0, atol=0)


def test_capture_last_layer_is_before_final_norm():
    model = tiny().eval()
    ids, mask = batch()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        h = layer_hidden_states(model, ids, mask, -1)
        torch.testing.assert_close(model.model.norm(h), full.hidden_states[-1])


def test_stop_skips_later_layers_and_head():
    model = tiny()
    ids, mask = batch()
    calls = []
    hooks = [model.model.layers[i].register_forward_hook(lambda *a, i=i: calls.append(i))
             for i in range(4)]
    hooks.append(model.lm_head.register_forward_hook(lambda *a: calls.append("head")))
    with capture_layer(model, [0, 1], stop=True) as cap:
        assert cap.run(input_ids=ids, attention_mask=mask) is None
        assert set(cap.features) == {0, 1}
    assert calls == [0, 1]
    calls.clear()
    with capture_layer(model, -1, stop=True) as cap:  # last layer: stops at the final norm
        cap.run(input_ids=ids, attention_mask=mask)
    assert calls == [0, 1, 2, 3]
    for h in hooks:
        h.remove()
    # every hook of the capture is gone once the block exits
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks


@pytest.mark.parametrize("checkpointing", [False, True])
def test_stopped_forward_gradients_match_full_forward(checkpointing):
    """Backward through early-stopped features equals backward through a full forward."""
    ids, mask = batch()
    grads = []
    for stop in (False, True):
        model = tiny()
        model.train()
        if checkpointing:
            _enable_checkpointing(model)
            assert model.is_gradient_checkpointing  # public in every transformers version
        with capture_layer(model, 1, stop=stop) as cap:
            cap.run(input_ids=ids, attention_mask=mask, use_cache=False)
            h = cap[1]
        (h.pow(2).sum()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert model.model.layers[3].mlp.down_proj.weight.grad is None
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=0)


def test_missing_capture_raises():
    model = tiny()
    with capture_layer(model, 1) as cap:
        with pytest.raises(KeyError, match="not captured"):
            cap[1]
        with pytest.raises(ValueError, match="out of range"):
            cap[9]


def hand_case():
    # B=2, T=3, D=2; sequence 0 masks tokens 1, 2; sequence 1 masks token 0 only.
    hidden = torch.tensor([[[1., 2.], [3., 4.], [5., 8.]],
                           [[7., 1.], [0., 0.], [9., 9.]]])
    mask = torch.tensor([[False, True, True], [True, False, False]])
    return hidden, mask


def test_pool_mean_last_token_hand_checked():
    hidden, mask = hand_case()
    concepts = torch.tensor([4, 9])
    feats, labels = pool_features(hidden, mask, "mean", concepts)
    torch.testing.assert_close(feats, torch.tensor([[4., 6.], [7., 1.]]))
    assert labels.tolist() == [4, 9]
    feats, labels = pool_features(hidden, mask, "last", concepts, label_by="sequence")
    torch.testing.assert_close(feats, torch.tensor([[5., 8.], [7., 1.]]))
    assert labels.tolist() == [0, 1]
    feats, labels = pool_features(hidden, mask, "token", concepts)
    torch.testing.assert_close(feats, torch.tensor([[3., 4.], [5., 8.], [7., 1.]]))
    assert labels.tolist() == [4, 4, 9]
    _, labels = pool_features(hidden, mask, "token", concepts, label_by="sequence")
    assert labels.tolist() == [0, 0, 1]
    _, labels = pool_features(hidden, mask, "token")  # no concept ids: one concept
    assert labels.tolist() == [0, 0, 0]


def test_pool_gradients_flow_to_masked_tokens_only():
    hidden, mask = hand_case()
    hidden.requires_grad_(True)
    feats, _ = pool_features(hidden, mask, "mean")
    feats.sum().backward()
    expected = torch.tensor([[0., .5, .5], [1., 0., 0.]]).unsqueeze(-1).expand(2, 3, 2)
    torch.testing.assert_close(hidden.grad, expected)


def test_pool_bf16_mean_keeps_dtype():
    hidden, mask = hand_case()
    feats, _ = pool_features(hidden.bfloat16(), mask, "mean")
    assert feats.dtype == torch.bfloat16
    torch.testing.assert_close(feats.float(), torch.tensor([[4., 6.], [7., 1.]]))


def test_pool_errors():
    hidden, mask = hand_case()
    with pytest.raises(ValueError, match="mode"):
        pool_features(hidden, mask, "max")
    with pytest.raises(ValueError, match="label_by"):
        pool_features(hidden, mask, "mean", label_by="author")
    with pytest.raises(ValueError, match="mask must have shape"):
        pool_features(hidden, mask[:, :2], "mean")
    with pytest.raises(ValueError, match="hidden must be"):
        pool_features(hidden[0], mask, "mean")
    with pytest.raises(TypeError, match="integer"):
        pool_features(hidden, mask, "mean", torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="concept_ids"):
        pool_features(hidden, mask, "mean", torch.tensor([1, 2, 3]))
    empty = mask.clone()
    empty[1] = False
    with pytest.raises(ValueError, match="no token in sequence"):
        pool_features(hidden, empty, "last")
    feats, labels = pool_features(hidden, empty, "token")  # token pooling just has fewer rows
    assert feats.shape == (2, 2) and labels.shape == (2,)
