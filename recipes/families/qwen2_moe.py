"""Qwen2-MoE (Qwen/Qwen1.5-MoE-A2.7B, Qwen/Qwen2-57B-A14B and their Chat/Instruct versions).

    python recipes/families/qwen2_moe.py Qwen/Qwen1.5-MoE-A2.7B --out qwen2moe-dynamoq

What the family is: every layer has many small routed experts (A2.7B: 60, top-4; 57B: 64, top-8)
and one large shared expert (4x a routed expert in A2.7B: 5632 vs 1408) that every token goes
through, scaled per token by sigmoid(shared_expert_gate(x)), a [H -> 1] linear gate.
A2.7B: H 2048, routed I 1408, shared I 5632; 57B: H 3584, routed I 2560, shared I 20480.

Settings and why:
- group_size 128: divides every input dim above (1408 = 11 x 128, 2560, 3584, 5632, 20480).
- shared_bits 8: the shared expert sees every token, so its error reaches every token; 8 bits
  keeps it near lossless. It is 6% (A2.7B) to 12% (57B) of the size of the routed experts and
  is reported apart from them ("other" in bits_report). Its sigmoid gate is a single row and
  stays in 16 bit (dynamoq quantizes the shared expert's gate/up/down projections, never routers
  or gates).
- target_bits 3.0 with GPTQ for the routed experts: 60-64 fine-grained experts give the
  allocation room to put 2 bits on rarely used experts and 4-8 on the busy ones.
- Qwen models are bilingual: add `--data chinese` (a built-in domain) if Chinese matters to you.
"""
from _recipe import Recipe, run

RECIPE = Recipe(
    family="Qwen2-MoE",
    model_types=("qwen2_moe",),
    checkpoints=("Qwen/Qwen1.5-MoE-A2.7B", "Qwen/Qwen2-57B-A14B"),
    group_size=128,
    target_bits=3.0,
    shared_bits=8,
)


def main(argv=None):
    return run(RECIPE, argv, __doc__)


if __name__ == "__main__":
    main()
