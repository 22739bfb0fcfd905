"""NeuronExplorer: its controls drive what it shows (headless: observers run synchronously)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import torch  # noqa: E402
from helpers import tiny_model  # noqa: E402

from lsa import neurons as N  # noqa: E402
from widgets.neurons import MODES, SCOPES, NeuronExplorer  # noqa: E402


def _setup():
    model = tiny_model("gpt2")
    g = torch.Generator().manual_seed(0)
    words = lambda lo, hi: " ".join(f"w{int(i)}" for i in torch.randint(lo, hi, (6,), generator=g))
    texts = {"en": [words(30, 60) for _ in range(12)], "zh": [words(60, 97) for _ in range(12)]}
    stats = N.collect_stats(model, texts, progress=False)
    lape = N.lape(stats, top_rate=0.05)
    return model, texts, stats, lape


def test_layer_and_neuron_controls_show_that_neurons_statistics():
    model, texts, stats, lape = _setup()
    ex = NeuronExplorer(stats, model=model, lape=lape, texts=texts, k=3)
    ex.layer.value = 1
    ex.neuron.value = 17
    assert ex.current == (1, 17)
    want = stats.prob[:, 1, 17].tolist()
    assert ex.profile["prob"].tolist() == want
    assert "layer 1, neuron 17" in ex.profile_html.value
    # top tokens: the recorded activations of neuron 17 in layer 1, computed here with a plain hook
    acts = []
    h = model.module("mlp_act", 1).register_forward_hook(lambda m, a, o: acts.append(o[0, :, 17]))
    with torch.no_grad():
        for text in texts["zh"]:
            model.hf(torch.tensor([model.tokenizer(text)["input_ids"]]))
    h.remove()
    best = torch.cat(acts).max().item()
    top_zh = ex.top[ex.top.language == "zh"]
    assert abs(top_zh["activation"].iloc[0] - best) < 1e-5
    # promoted tokens: W_out row through the final LayerNorm's linear part and the unembedding
    d = model.hf.transformer.h[1].mlp.c_proj.weight[17]
    d = (d - d.mean()) * model.hf.transformer.ln_f.weight
    logits = model.hf.lm_head.weight @ d
    assert ex.promoted.query("direction == 'promoted'")["token_id"].iloc[0] == int(logits.argmax())
    assert ex.figure is not None


def test_picking_a_lape_row_moves_the_explorer_to_that_neuron():
    model, texts, stats, lape = _setup()
    ex = NeuronExplorer(stats, model=model, lape=lape, texts=texts)
    label, (layer, neuron) = ex.row.options[-1]
    ex.row.value = (layer, neuron)
    assert (ex.layer.value, ex.neuron.value) == (layer, neuron)
    assert ex.profile["mean"].tolist() == stats.mean[:, layer, neuron].tolist()


def test_out_of_range_neuron_shows_a_message_not_a_traceback():
    model, texts, stats, lape = _setup()
    ex = NeuronExplorer(stats, model=model, lape=lape, texts=texts)
    ex.neuron.value = 5
    shown = ex.profile.copy()
    ex.neuron.value = 10_000
    assert "out of range" in ex.message.value and "128 neurons" in ex.message.value
    assert ex.profile.equals(shown)  # still the last valid neuron
    ex.layer.value = -1
    assert "layer -1 out of range" in ex.message.value


def test_generate_button_shows_unchanged_and_steered_generations():
    model, texts, stats, lape = _setup()
    ex = NeuronExplorer(stats, model=model, lape=lape, texts=texts)
    ex.button.click()
    assert "prompt" in ex.message.value  # no prompt yet
    ex.prompt.value = "w30 w31 w32"
    ex.max_new.value = 3
    ex.scope.value = SCOPES[1]
    ex.mode.value = MODES[1]
    ex.language.value = "zh"
    ex.factor.value = 50.0
    ex.button.click()
    assert ex.generation["prompt"] == "w30 w31 w32"
    # the same edits applied by an independent hook: zh LAPE neurons set to 50 x their zh mean
    masks = lape.mask("zh")
    mean = stats.mean[stats.languages.index("zh")]
    ids = model.tokenizer("w30 w31 w32")["input_ids"]
    hooks = []
    for layer, idx in enumerate(masks):
        if len(idx):

            def hook(m, a, o, idx=idx, layer=layer):
                o = o.clone()
                o[..., idx] = (50.0 * mean[layer, idx]).float()
                return o

            hooks.append(model.module("mlp_act", layer).register_forward_hook(hook))
    with torch.no_grad():
        for _ in range(3):
            ids.append(int(model.hf(torch.tensor([ids])).logits[0, -1].argmax()))
    for h in hooks:
        h.remove()
    assert ex.generation["steered"] == model.tokenizer.decode(ids[3:], skip_special_tokens=True)
    assert ex.generation["baseline"] in ex.generation_html.value


def test_explorer_without_a_model_shows_stats_only():
    _, _, stats, _ = _setup()
    ex = NeuronExplorer(stats)
    ex.neuron.value = 3
    assert ex.profile["prob"].tolist() == stats.prob[:, 0, 3].tolist()
    assert ex.top is None and ex.promoted is None and ex.button.disabled


def test_explorer_from_a_report_lists_plnd_neurons():
    model, texts, _, _ = _setup()
    report = N.language_report(
        model, texts, top_rate=0.05, plnd_top_rate=0.05, n_random=1, strength=1.0, max_new_tokens=2, progress=False
    )
    ex = NeuronExplorer.from_report(report, model, texts, method="plnd")
    layer, neuron = ex.row.options[1][1]
    first = report.plnd.table.iloc[0]
    assert (layer, neuron) == (first.layer, first.neuron)
    ex.row.value = (layer, neuron)
    assert ex.current == (layer, neuron)


def test_the_explorer_opens_on_the_strongest_neuron_of_the_first_languages_set():
    model, texts, stats, lape = _setup()
    first = lape.languages[0]
    mask = lape.mask(first)
    assert sum(len(m) for m in mask) > 0
    # by hand: the neuron of the first language's mask with the highest activation probability in that language
    j = list(stats.languages).index(first)
    candidates = [(float(stats.prob[j, layer, n]), layer, int(n)) for layer, idx in enumerate(mask) for n in idx]
    _, layer, neuron = max(candidates, key=lambda c: c[0])
    ex = NeuronExplorer(stats, model=model, lape=lape, texts=texts)
    assert ex.current == (layer, neuron) and ex.row.value == (layer, neuron)
    assert f"L{layer} N{neuron}  [{first}]" in ex.row.label
    assert ex.profile["prob"].tolist() == stats.prob[:, layer, neuron].tolist()
    assert lape.strongest("zh") in {(lay, int(n)) for lay, idx in enumerate(lape.mask("zh")) for n in idx}
