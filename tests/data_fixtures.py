"""Small hand-made rows shared by the data tests (importable: pytest puts tests/ on sys.path)."""

GOOD = {"id": "ok", "problem": "1+1?", "answer": "2", "solution": "1+1=\\boxed{2}"}

# The Elliott/Openr1-Math-46k-8192 schema (as LUFFY / ReLIFT read it): prompt = [system, user]
# messages, target = [assistant message], reward_model.ground_truth; extra_info.index is -1.
SYSTEM = "Your task is to follow a systematic, thorough reasoning process..."
OPENR1_ROWS = [
    {
        "data_source": "olympiads",
        "prompt": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"What is {i}+{i}?"},
        ],
        "target": [
            {
                "role": "assistant",
                "content": f"<think>\nAdd: {i}+{i}={2 * i}.\n</think>\n\nSo \\boxed{{{2 * i}}}.",
            }
        ],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": str(2 * i)},
        "extra_info": {"index": -1, "split": "default"},
    }
    for i in range(4)
]
