"""Issue 19 item 3: the wrapper does not hide the wrapped layer's attributes (Whisper reads `conv1.stride[0]`)."""

import pytest
import torch
from torch import nn

import dendrite_convert as dc
from dendrite_convert.exporting.fold import fold_model
from dendrite_convert.exporting.folded import FoldedDendrites


class ReadsAttributes(nn.Module):
    """Forward reads the hyper-parameters of its layers, as model code does to compute lengths and shapes."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv1d(3, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        conv = self.conv1
        length = (x.shape[-1] + 2 * conv.padding[0] - conv.dilation[0] * (conv.kernel_size[0] - 1) - 1) // conv.stride[0] + 1
        h = conv(x)[..., :length]
        h = h * (conv.out_channels == self.fc.in_features) + conv.in_channels * self.fc.out_features
        return self.fc(h.mean(-1))


def _dendritic():
    from conftest import randomize_dendrites

    converted = dc.convert(ReadsAttributes(), dc.DendriteConfig(dendrites=2), example_inputs=[{"shape": [2, 3, 11]}])
    converted.model.eval()
    randomize_dendrites(converted.model)
    return converted


def test_wrapped_layers_expose_their_attributes():
    converted = _dendritic()
    conv, fc = converted.model.conv1, converted.model.fc
    assert type(conv).__name__ == "DendriteConv1d" and type(fc).__name__ == "DendriteLinear"
    assert (conv.stride, conv.padding, conv.kernel_size, conv.in_channels, conv.out_channels) == ((2,), (1,), (3,), 3, 8)
    assert (fc.in_features, fc.out_features, fc.weight.shape) == (8, 4, (4, 8))
    assert conv.num_dendrites == 2  # the wrapper's own attributes come first
    with pytest.raises(AttributeError, match="'DendriteConv1d' object \\(wrapping Conv1d\\) has no attribute 'strides'"):
        conv.strides
    x = torch.randn(5, 3, 11)
    assert converted.model(x).shape == (5, 4)


@pytest.mark.parametrize("layout", ["separate", "concat"])
def test_folded_dendrites_expose_the_main_layer_attributes(layout):
    converted = _dendritic()
    folded = fold_model(converted.model, gemm_layout=layout)
    conv = folded.conv1
    assert isinstance(conv, FoldedDendrites) and conv.layout == layout
    assert (conv.stride, conv.padding, conv.out_channels, conv.in_channels) == ((2,), (1,), 8, 3)  # not the fused width
    assert not any("hyper" in name for name in folded.state_dict())
    x = torch.randn(5, 3, 13)
    torch.testing.assert_close(folded(x), converted.model(x), rtol=0, atol=1e-5)


def test_a_model_reading_attributes_exports_with_parity(tmp_path):
    converted = _dendritic()
    report = dc.export(converted, tmp_path / "m.onnx", dc.ExportConfig(atol=1e-5, rtol=1e-5, gemm_layout="concat",
                                                                        latency=False))
    assert report.verify.ok and {r.layout for r in report.folds} == {"concat"}


def test_whisper_converts_and_runs_with_dendrites():
    """transformers' Whisper encoder reads `self.conv1.stride[0]`; tiny random config, no download."""
    from transformers import WhisperConfig, WhisperModel

    config = WhisperConfig(vocab_size=50, num_mel_bins=8, encoder_layers=1, decoder_layers=1, d_model=16,
                           encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
                           max_source_positions=6, max_target_positions=8, pad_token_id=0, bos_token_id=1,
                           eos_token_id=2, decoder_start_token_id=1)
    model = WhisperModel(config).eval()
    features, ids = torch.randn(2, 8, 12), torch.tensor([[1, 3, 4], [1, 5, 6]])
    reference = model(input_features=features, decoder_input_ids=ids).last_hidden_state
    converted = dc.convert(model, dc.DendriteConfig(dendrites=0))
    assert {"encoder.conv1", "encoder.conv2"} <= {t.name for t in converted.report.targets}
    assert torch.equal(converted.model(input_features=features, decoder_input_ids=ids).last_hidden_state, reference)
    from conftest import randomize_dendrites
    from tests.helpers_export import add_dendrites

    add_dendrites(converted.model, k=1)
    randomize_dendrites(converted.model)
    out = converted.model(input_features=features, decoder_input_ids=ids).last_hidden_state
    assert out.shape == reference.shape and (out - reference).abs().max() > 1e-3


def test_a_copy_of_a_wrapped_weight_normed_conv_keeps_its_dendrites():
    """transformers' Wav2Vec2 weight-norms its positional conv (torch's parametrization, whose class defines
    `__deepcopy__`): the wrapper must not hand that hook out, or every copy (the fold's, the best-model snapshot's)
    is the bare conv and the export is wrong (it failed verification by 0.5) and the checkpoint loses a target."""
    import copy

    from conftest import randomize_dendrites
    from tests.helpers_export import add_dendrites
    from transformers import Wav2Vec2Config, Wav2Vec2Model

    config = Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                            conv_dim=[8, 8], conv_stride=[4, 4], conv_kernel=[8, 4], num_conv_pos_embeddings=8,
                            num_conv_pos_embedding_groups=2)
    converted = dc.convert(Wav2Vec2Model(config).eval(), dc.DendriteConfig(dendrites=0))
    add_dendrites(converted.model, k=1)
    randomize_dendrites(converted.model)
    conv = converted.model.encoder.pos_conv_embed.conv
    assert type(conv.base_layer).__name__ == "ParametrizedConv1d"
    copied = copy.deepcopy(conv)
    assert type(copied) is type(conv) and copied.num_dendrites == 1
    x, audio = torch.randn(2, 16, 9), torch.randn(2, 200)
    with torch.no_grad():
        torch.testing.assert_close(copied(x), conv(x), rtol=0, atol=0)
        expected = converted.model(audio).last_hidden_state
        torch.testing.assert_close(fold_model(converted.model)(audio).last_hidden_state, expected, rtol=0, atol=1e-5)
