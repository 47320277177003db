"""Dense held-out perplexity of a model with its gated matrices quantized, against the float model.

    python benchmarks/quant_dense.py MODEL_DIR [--weights int8,int4,int4-gptq] [--group-size 64] [--max-tokens 8192]
        [--samples 16 --seq-len 512]

The question it answers is issue 30's gate for an activation-aware quantizer: is round-to-nearest int4
(``wina_convert.quant.quantize_rtn``, the layout ``convert --weights`` writes) more than 5% above the float
model's perplexity? The transformers model is loaded in float32, every gated linear's weight is replaced by its
dequantized quantization (what ``wina_convert.load`` runs at sparsity 0), and the bundled held-out text is scored
in the windows ``wina eval`` uses. Prints one JSON line per format.

``intN-gptq``: ``wina_convert.quant.quantize_gptq`` (the activation-aware variant that can act on this layout: the
rows' rounding errors pushed onto the rows not yet quantized), each gated linear's Hessian ``sum x x^T`` measured on
the float model's inputs over ``--samples`` windows of the bundled calibration set (not the held-out text).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--weights", default="int8,int4")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--float-perplexity", type=float, default=None,
                        help="the float model's, measured by an earlier run on the same windows (not measured again)")
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wina_convert.arch import adapter_for
    from wina_convert.calibration.text import eval_windows, heldout_texts
    from wina_convert.evaluate.perplexity import perplexity
    from wina_convert.calibration.text import read_texts, token_windows
    from wina_convert.quant import quantize_gptq, quantize_rtn

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts, name = heldout_texts(None)
    windows = eval_windows(tokenizer, texts, 512, args.max_tokens)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    adapter = adapter_for(model.config.model_type)
    linears = [model.get_submodule(adapter.layer_key(layer, n)) for layer in range(model.config.num_hidden_layers)
               for n in adapter.gated_linears()]
    floats = [linear.weight.detach().clone() for linear in linears]
    start = time.perf_counter()
    base = args.float_perplexity or perplexity(model, windows)
    print(json.dumps({"model": args.model, "weights": "float", "perplexity": base, "tokens": int(windows[:, 1:].numel()),
                      "text": name, "seconds": round(time.perf_counter() - start, 1),
                      "given": args.float_perplexity is not None}), flush=True)
    hessians = None
    for fmt in args.weights.split(","):
        bits = int(fmt.removeprefix("int").removesuffix("-gptq"))
        start = time.perf_counter()
        if fmt.endswith("-gptq") and hessians is None:
            with torch.no_grad():
                for linear, weight in zip(linears, floats):
                    linear.weight.copy_(weight)
            texts, _ = read_texts(None)
            hessians = input_moments(model, linears, token_windows(tokenizer, texts, args.samples, args.seq_len, 0))
        with torch.no_grad():
            for index, (linear, weight) in enumerate(zip(linears, floats)):
                q = (quantize_gptq(weight, bits, args.group_size, hessians[index]) if fmt.endswith("-gptq")
                     else quantize_rtn(weight, bits, args.group_size))
                linear.weight.copy_(q.dequantize())
        ppl = perplexity(model, windows)
        print(json.dumps({"model": args.model, "weights": fmt, "group_size": args.group_size, "perplexity": ppl,
                          "over_float": ppl / base - 1, "seconds": round(time.perf_counter() - start, 1)}), flush=True)


def input_moments(model, linears, windows: torch.Tensor) -> list[torch.Tensor]:
    """``sum_t x_t x_t^T`` (float64 ``[in, in]``) of every linear's input over ``windows`` (the float model)."""
    moments = [torch.zeros(l.in_features, l.in_features, dtype=torch.float64) for l in linears]

    def hook(index):
        def add(module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            moments[index].addmm_(x.T, x)
        return add

    handles = [l.register_forward_pre_hook(hook(i)) for i, l in enumerate(linears)]
    try:
        with torch.no_grad():
            for row in windows:
                model(row[None])
    finally:
        for h in handles:
            h.remove()
    return moments


if __name__ == "__main__":
    main()
