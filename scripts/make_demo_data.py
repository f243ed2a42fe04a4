"""Write the small shipped datasets under data/ and the tokenizer corpus (deterministic; rerun to regenerate).

The chats are arithmetic word problems with worked answers ending in `#### N` (GSM8K's answer format), some
multi-turn, some with a system prompt, and some unanswerable ones whose right answer is to abstain — the
hallucination case these users study. Other files hold the same kind of content in the shapes real datasets
come in (GSM8K, SQuAD v2, alpaca, sharegpt, prompt/query/response), so every converter has shipped data.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMES = ["Tom", "Sara", "Ali", "Mei", "Lena", "Omar", "Ivan", "Priya", "Jon", "Ana", "Kofi", "Yuki", "Noah", "Eva"]
THINGS = ["apples", "pencils", "marbles", "stickers", "books", "cookies", "stamps", "shells", "cards", "eggs"]
SYSTEM = [
    "You are a careful math tutor. Show your work and end with '#### <answer>'.",
    "Solve the problem step by step. If the question cannot be answered from what it says, say so.",
    "You are a helpful assistant.",
]


def problem(rng: random.Random) -> tuple[str, str, int]:
    """One word problem: (question, worked answer ending in #### N, N)."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    kind = rng.randrange(5)
    a, b = rng.randint(2, 60), rng.randint(2, 30)
    if kind == 0:
        n = a + b
        q = f"{name} has {a} {thing}. {name} gets {b} more. How many {thing} does {name} have now?"
        w = f"{name} starts with {a} {thing} and gets {b} more, so {a} + {b} = {n}."
    elif kind == 1:
        a = a + b
        n = a - b
        q = f"{name} had {a} {thing} and gave {b} of them to a friend. How many {thing} are left?"
        w = f"{name} gave away {b} of {a} {thing}, so {a} - {b} = {n} are left."
    elif kind == 2:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        n = a * b
        q = f"There are {a} boxes with {b} {thing} in each box. How many {thing} are there in total?"
        w = f"{a} boxes of {b} {thing} make {a} * {b} = {n} {thing}."
    elif kind == 3:
        b = rng.randint(2, 9)
        n = rng.randint(2, 12)
        a = b * n
        q = f"{name} shares {a} {thing} equally among {b} friends. How many {thing} does each friend get?"
        w = f"Each friend gets {a} / {b} = {n} {thing}."
    else:
        price, count = rng.randint(2, 9), rng.randint(2, 6)
        cost = price * count
        paid = ((cost // 10) + 1) * 10
        n = paid - cost
        q = f"{name} buys {count} {thing} at ${price} each and pays with ${paid}. How much change does {name} get?"
        w = f"The {thing} cost {count} * {price} = ${cost}. The change is {paid} - {cost} = ${n}."
    return q, f"{w}\n#### {n}", n


def unanswerable(rng: random.Random) -> tuple[str, str]:
    """A question missing the number it needs, answered by abstaining."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    b = rng.randint(2, 30)
    q = f"{name} has some {thing} and finds {b} more. How many {thing} does {name} have now?"
    a = f"The problem does not say how many {thing} {name} had at first, so the total cannot be known. I don't know."
    return q, a


def chat(rng: random.Random) -> list[dict[str, str]]:
    """A conversation of one or two exchanges, sometimes with a system prompt."""
    messages = []
    if rng.random() < 0.35:
        messages.append({"role": "system", "content": rng.choice(SYSTEM)})
    if rng.random() < 0.12:
        q, a = unanswerable(rng)
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return messages
    q, a, n = problem(rng)
    messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    if rng.random() < 0.3:
        extra = rng.randint(2, 20)
        messages += [
            {"role": "user", "content": f"Now add {extra} to that answer."},
            {"role": "assistant", "content": f"{n} + {extra} = {n + extra}.\n#### {n + extra}"},
        ]
    return messages


def squad_row(rng: random.Random, index: int) -> dict:
    """A SQuAD v2-shaped row; a third of them unanswerable (empty answers)."""
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    count, town = rng.randint(2, 90), rng.choice(["Oslo", "Lima", "Pune", "Cork", "Kyoto", "Accra"])
    context = f"{name} lives in {town} and collects {thing}. Last year {name} had {count} {thing} in a blue box."
    if index % 3 == 2:
        question = f"How old is {name}?"
        answers = {"text": [], "answer_start": []}
    elif index % 3 == 1:
        question = f"Where does {name} live?"
        answers = {"text": [town], "answer_start": [context.index(town)]}
    else:
        question = f"How many {thing} did {name} have last year?"
        answers = {"text": [str(count)], "answer_start": [context.index(str(count))]}
    return {"id": f"demo-{index}", "title": name, "context": context, "question": question, "answers": answers}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line."""
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def main() -> None:
    """Regenerate every shipped data file."""
    rng = random.Random(1234)
    data = ROOT / "data"
    train = [{"messages": chat(rng)} for _ in range(480)]
    evaluation = [{"messages": chat(rng)} for _ in range(48)]
    write_jsonl(data / "demo_train.jsonl", train)
    write_jsonl(data / "demo_eval.jsonl", evaluation)

    gsm8k = []
    for _ in range(60):
        q, a, _n = problem(rng)
        gsm8k.append({"question": q, "answer": a.replace(". ", ".\n")})
    write_jsonl(data / "gsm8k_sample.jsonl", gsm8k)
    write_jsonl(data / "squad_v2_sample.jsonl", [squad_row(rng, i) for i in range(60)])

    alpaca = []
    for i in range(40):
        q, a, _n = problem(rng)
        row = {"instruction": "Solve the word problem.", "input": q, "output": a}
        if i % 4 == 0:
            row["system"] = rng.choice(SYSTEM)
        if i % 5 == 0:
            hq, ha, _ = problem(rng)
            row["history"] = [[hq, ha]]
        alpaca.append(row)
    (data / "alpaca_sample.json").write_text(json.dumps(alpaca, indent=1, ensure_ascii=False) + "\n")

    sharegpt = []
    for _ in range(40):
        roles = {"system": "system", "user": "human", "assistant": "gpt"}
        messages = chat(rng)
        row = {"conversations": [{"from": roles[m["role"]], "value": m["content"]} for m in messages]}
        sharegpt.append(row)
    write_jsonl(data / "sharegpt_sample.jsonl", sharegpt)

    pqr = []
    for _ in range(40):
        q, a, _n = problem(rng)
        pqr.append({"prompt": "Answer the question and end with '#### <answer>'.", "query": q, "response": a})
    write_jsonl(data / "pqr_sample.jsonl", pqr)

    corpus = []
    for row in train + evaluation:
        corpus += [m["content"] for m in row["messages"]]
    corpus += [row["context"] + " " + row["question"] for row in (squad_row(rng, i) for i in range(200))]
    corpus_path = ROOT / "llmhalluc" / "models" / "corpus.txt"
    corpus_path.write_text("\n".join(corpus) + "\n", encoding="utf-8")
    print(f"wrote {len(train)} train and {len(evaluation)} eval chats, samples, and {corpus_path}")

    # After everything above, with its own generator, so the files above (and the tiny tokenizer) never change.
    backtrack_rng = random.Random(4321)
    write_jsonl(data / "demo_backtrack.jsonl", [backtrack_chat(backtrack_rng) for _ in range(480)])
    write_jsonl(data / "demo_backtrack_eval.jsonl", [backtrack_chat(backtrack_rng) for _ in range(48)])
    print("wrote 480 train and 48 eval backtrack chats")
    write_dpo_pairs(data)


def write_dpo_pairs(data: Path) -> None:
    """Preference pairs from the demo chats (their own generator): the prompt, chosen = the right answer, rejected =
    the same working with a wrong result, or for an unanswerable question a made-up number instead of abstaining."""
    rng = random.Random(2468)
    for source, target in (("demo_train.jsonl", "demo_dpo.jsonl"), ("demo_eval.jsonl", "demo_dpo_eval.jsonl")):
        rows = [json.loads(line) for line in (data / source).read_text(encoding="utf-8").splitlines()]
        write_jsonl(data / target, [preference_pair(row["messages"], rng) for row in rows])
    print("wrote demo preference pairs")


def preference_pair(messages: list[dict[str, str]], rng: random.Random) -> dict:
    """{"messages": the chat up to its last answer, "chosen": that answer, "rejected": a wrong one}."""
    answer = messages[-1]["content"]
    if "\n#### " in answer:
        worked, right = answer.rsplit("\n#### ", 1)
        wrong = str(int(right) + rng.choice([-3, -2, -1, 1, 2, 3, 10])).lstrip("-") or "1"
        head, _, tail = worked.rpartition(right)
        rejected = f"{head}{wrong}{tail}\n#### {wrong}" if head else f"{worked}\n#### {wrong}"
    else:  # unanswerable: the rejected answer invents a number
        made_up = rng.randint(2, 60)
        rejected = f"{answer.rsplit('. ', 1)[0]}, so the answer is {made_up}.\n#### {made_up}"
    return {
        "messages": messages[:-1],
        "chosen": {"role": "assistant", "content": answer},
        "rejected": {"role": "assistant", "content": rejected},
    }


BACKTRACK = "<|BACKTRACK|>"


def backtrack_chat(rng: random.Random) -> dict:
    """A word problem whose worked answer writes a wrong number, takes it back with one backtrack token per token of
    the error (in the tiny tokenizer's tokens), and writes the right one; a third have no error, some two."""
    from llmhalluc.models.tiny import build_tokenizer

    tokenizer = build_tokenizer("chatml")
    question, answer, n = problem(rng)
    errors = rng.choice([0, 1, 1, 2])
    worked = answer.rsplit("\n#### ", 1)[0]
    # An error is " <number>" right after "=" or "####": a token of its own that starts with the space, taken back
    # whole, so the text after the backtracks reads "= <right number>".
    if errors:
        unit = "$" if f"= ${n}" in worked else ""
        head, _, tail = worked.rpartition(f"= {unit}{n}")
        near = n + rng.choice([-10, -2, -1, 1, 2, 10])
        wrong = str(near if near > 0 else n + 10) if rng.random() < 0.7 else str(rng.randint(1000, 99999))
        worked = f"{head}={retracted(tokenizer, f' {unit}{wrong}')} {unit}{n}{tail}"
    final = f"####{retracted(tokenizer, f' {n + 1}') if errors == 2 else ''} {n}"
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": f"{worked}\n{final}"}]}


def retracted(tokenizer, error: str) -> str:
    """The error followed by as many backtrack tokens as it has tokens."""
    return error + BACKTRACK * len(tokenizer(error, add_special_tokens=False)["input_ids"])


if __name__ == "__main__":
    main()
