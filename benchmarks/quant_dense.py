"""Dense held-out perplexity of a model with its gated matrices quantized, against the float model.

    python benchmarks/quant_dense.py MODEL_DIR [--weights int8,int4] [--group-size 64] [--max-tokens 8192]

The question it answers is issue 30's gate for an activation-aware quantizer: is round-to-nearest int4
(``wina_convert.quant.quantize_rtn``, the layout ``convert --weights`` writes) more than 5% above the float
model's perplexity? The transformers model is loaded in float32, every gated linear's weight is replaced by its
dequantized quantization (what ``wina_convert.load`` runs at sparsity 0), and the bundled held-out text is scored
in the windows ``wina eval`` uses. Prints one JSON line per format.
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
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from wina_convert.arch import adapter_for
    from wina_convert.calibration.text import eval_windows, heldout_texts
    from wina_convert.evaluate.perplexity import perplexity
    from wina_convert.quant import quantize_rtn

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    texts, name = heldout_texts(None)
    windows = eval_windows(tokenizer, texts, 512, args.max_tokens)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    adapter = adapter_for(model.config.model_type)
    linears = [model.get_submodule(adapter.layer_key(layer, n)) for layer in range(model.config.num_hidden_layers)
               for n in adapter.gated_linears()]
    floats = [linear.weight.detach().clone() for linear in linears]
    start = time.perf_counter()
    base = perplexity(model, windows)
    print(json.dumps({"model": args.model, "weights": "float", "perplexity": base, "tokens": int(windows[:, 1:].numel()),
                      "text": name, "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    for fmt in args.weights.split(","):
        bits = int(fmt.removeprefix("int"))
        start = time.perf_counter()
        with torch.no_grad():
            for linear, weight in zip(linears, floats):
                linear.weight.copy_(quantize_rtn(weight, bits, args.group_size).dequantize())
        ppl = perplexity(model, windows)
        print(json.dumps({"model": args.model, "weights": fmt, "group_size": args.group_size, "perplexity": ppl,
                          "over_float": ppl / base - 1, "seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
