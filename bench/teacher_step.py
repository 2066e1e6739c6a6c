"""Teacher-step rollout cost: our episode vs the ATLAS flow, generated tokens and wall time, same tiny models.

Ours (common/teaching.py `TeachingLoop.run`): per prompt, the student's baseline answer and diagnostic ONCE,
shared by the G teacher samples; the teacher samples G completions of the one filled prompt (prefilled once);
then one student answer per sample. The ATLAS flow: baseline, diagnostic, teacher and answer per *sample* -- here
the same loop over each prompt repeated G times with one teacher sample each, so every stage and every model is
the same and only the sharing differs.

Both: a tiny random Llama as the student and another as the teacher (scripts/make_tiny_model.py, float32, sdpa,
1 thread), the spec's templates, arithmetic questions, transformers generate, sampling at temperature 1 for the
teacher and greedy for the student. No stop token is sampled (stop ids set to one the models never emit), so every
generation runs its full budget and the token counts are exact: baseline and answer `--answer-tokens`, diagnostic
`--probe-tokens`, teaching `--teacher-tokens`. Rewards and the update are the same for both flows and left out.

    python bench/teacher_step.py                  # G=8, 4 prompts, 3 timed repeats of each flow (alternating)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]


class CountingEngine:
    """HFGenerateEngine plus a count of the tokens it generated."""

    def __init__(self, engine):
        self.engine, self.tokens = engine, 0

    def generate(self, prompt_ids, params):
        rollouts = self.engine.generate(prompt_ids, params)
        self.tokens += sum(len(r.completion_ids) for r in rollouts)
        return rollouts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--probe-tokens", type=int, default=48)
    parser.add_argument("--answer-tokens", type=int, default=24)
    parser.add_argument("--teacher-tokens", type=int, default=32)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from common.data import make_arithmetic_dataset
    from common.rollout import HFGenerateEngine, SamplingParams
    from common.teaching import EngineStudent, TeacherArgs, TeachingLoop, answer_checker
    from make_tiny_model import save_tiny_model

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        student_dir = save_tiny_model(Path(tmp) / "student", hidden_size=args.hidden_size, layers=2, heads=4, seed=0)
        teacher_dir = save_tiny_model(Path(tmp) / "teacher", hidden_size=args.hidden_size, layers=2, heads=4, seed=1)
        load = lambda path: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,  # noqa: E731
                                                                 attn_implementation="sdpa").eval()
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(student_dir)
        never = [len(tokenizer) + 7]   # a stop id outside the vocabulary: every generation runs its budget
        student_engine = CountingEngine(HFGenerateEngine(load(student_dir), tokenizer, stop_token_ids=never))
        teacher_engine = CountingEngine(HFGenerateEngine(load(teacher_dir), tokenizer, stop_token_ids=never))

        class Cfg:
            seed = 0
            make_dataset_fn = {}
        examples = make_arithmetic_dataset(Cfg(), num_samples=args.prompts, max_operand=99)[:args.prompts]
        targs = TeacherArgs(max_probe_tokens=args.probe_tokens, student_max_new_tokens=args.answer_tokens)
        loop = TeachingLoop(targs, EngineStudent(student_engine, tokenizer), teacher_engine, tokenizer,
                            answer_checker("arithmetic", None))
        G = args.num_generations

        def ours():
            loop.run(examples, SamplingParams(temperature=1.0, max_new_tokens=args.teacher_tokens, num_generations=G))

        def atlas():
            repeated = [e for e in examples for _ in range(G)]
            loop.run(repeated, SamplingParams(temperature=1.0, max_new_tokens=args.teacher_tokens, num_generations=1))

        results = {"ours": [], "atlas": []}
        tokens = {}
        ours()   # warm-up
        order = ["ours", "atlas", "atlas", "ours"] * ((args.repeats + 1) // 2)
        for name in order[:2 * args.repeats]:
            student_engine.tokens = teacher_engine.tokens = 0
            start = time.perf_counter()
            (ours if name == "ours" else atlas)()
            results[name].append(time.perf_counter() - start)
            tokens[name] = (student_engine.tokens, teacher_engine.tokens)

    o, a = statistics.median(results["ours"]), statistics.median(results["atlas"])
    (os_, ot), (as_, at) = tokens["ours"], tokens["atlas"]
    print(f"{args.prompts} prompts x G={G}; budgets: probe {args.probe_tokens}, answers {args.answer_tokens}, "
          f"teacher {args.teacher_tokens} tokens; {args.repeats} runs each")
    print("| flow | student tokens | teacher tokens | all generated tokens | wall s per step (median) |")
    print("|---|---|---|---|---|")
    print(f"| ours (baseline + diagnostic per prompt) | {os_} | {ot} | {os_ + ot} | {o:.2f} |")
    print(f"| ATLAS (baseline + diagnostic per sample) | {as_} | {at} | {as_ + at} | {a:.2f} |")
    print(f"| ratio | {os_ / as_:.3f}x | {ot / at:.3f}x | {(os_ + ot) / (as_ + at):.3f}x | {o / a:.3f}x |")


if __name__ == "__main__":
    main()
