"""Item 9 of issue 30: the prompt-token estimate against a real tokenizer (SmolLM2's BPE, the
bundled model's own) on real English records, Chinese, Japanese and Korean text, and code: never
below it, never absurdly above it."""
from __future__ import annotations

import json

import pytest

from mergeit_spark.llm.prompt import build_messages
from mergeit_spark.llm.tokens import (MESSAGE_OVERHEAD, char_cost, estimate_prompt_tokens,
                                      estimate_tokens)

ZH = [
    "请解释为什么充足的睡眠对健康很重要，并给出三条改善睡眠质量的建议。",
    "睡眠让身体修复组织，让大脑巩固记忆。长期睡眠不足会削弱免疫力、注意力和情绪调节能力。"
    "建议：1. 每天固定时间上床和起床；2. 睡前一小时不看手机；3. 下午以后避免喝咖啡。",
    "将下列数字按从小到大的顺序排列，然后求出它们的中位数：7、2、9、4、3。",
    "北京是中华人民共和国的首都，也是全国的政治、文化和国际交往中心，拥有三千多年的建城史。",
    "机器学习是人工智能的一个分支，它让计算机从数据中学习规律，而不是依靠人工编写的规则。"
    "常见的方法包括监督学习、无监督学习和强化学习。",
    "用 Python 写一个函数，判断一个字符串是不是回文，并说明它的时间复杂度。",
]
JA = [
    "健康を保つための三つのコツを挙げ、それぞれがなぜ大切なのかを説明してください。",
    "睡眠中に体は組織を修復し、脳は記憶を整理します。睡眠が足りないと、集中力や免疫力が落ちてしまいます。",
    "次の文章を要約してください。東京は日本の首都であり、人口は約1400万人です。"
    "経済、文化、政治の中心地として知られています。",
    "プログラミングを学ぶときは、まず小さなプログラムを書いて動かしてみることが大切です。"
    "エラーメッセージをよく読み、一つずつ原因を確かめましょう。",
    "ラーメンはもともと中国から伝わった料理ですが、日本で独自に発展し、今では世界中で人気があります。",
    "「吾輩は猫である」は夏目漱石の小説で、猫の目から見た人間社会を風刺的に描いています。",
]
KO = [
    "건강을 유지하기 위한 세 가지 방법을 제시하고 각각이 왜 중요한지 설명하세요.",
    "수면은 몸이 조직을 회복하고 뇌가 기억을 정리하는 시간입니다. 잠이 부족하면 집중력과 면역력이 떨어집니다.",
    "서울은 대한민국의 수도이며 약 천만 명이 살고 있는 대도시입니다.",
]
CODE = [
    "def median(xs):\n    xs = sorted(xs)\n    n = len(xs)\n    mid = n // 2\n"
    "    return xs[mid] if n % 2 else (xs[mid - 1] + xs[mid]) / 2\n",
    "SELECT customer_id, COUNT(*) AS orders\nFROM orders\nWHERE created_at >= '2024-01-01'\n"
    "GROUP BY customer_id\nHAVING COUNT(*) > 5\nORDER BY orders DESC;",
    "for (let i = 0; i < arr.length; i++) {\n  if (arr[i] % 2 === 0) { console.log(`${i}: ${arr[i]}`); }\n}",
    "<ul>\n  <li><a href=\"/home\">Home</a></li>\n  <li><a href=\"/about?id=42&lang=en\">About</a></li>\n</ul>",
    "0 0 1 | 1\n0 1 0 | 0\n1 1 1 | 1\n3.14159, 2.71828, 1.41421, 1.73205, 2.23606",
]


@pytest.fixture(scope="module")
def smol():
    """Token count of SmolLM2-135M's tokenizer (the GGUF's vocabulary only, no weights)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from mergeit_spark.llm.server import find_default_model

    llm = llama_cpp.Llama(model_path=str(find_default_model()), vocab_only=True, verbose=False)

    def count(text: str, special: bool = False) -> int:
        return len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=special))
    return count


@pytest.fixture(scope="module")
def english(shared_data):
    """Every 5th record of the real data set, its three fields joined (read in place)."""
    rows = json.loads((shared_data / "mergeit-6k.json").read_text())[::5]
    return [" ".join(t for t in (r["instruction"], r["input"], r["output"]) if t.strip()) for r in rows]


def ratios(texts, smol):
    return [(estimate_tokens(t), smol(t), t) for t in texts]


def test_english_records_are_never_underestimated(english, smol):
    counted = ratios(english, smol)
    short = [(e, n, t[:80]) for e, n, t in counted if e < n]
    assert short == []
    total_estimate, total_tokens = sum(e for e, _, _ in counted), sum(n for _, n, _ in counted)
    assert total_estimate <= 3 * total_tokens, total_estimate / total_tokens


@pytest.mark.parametrize("name, texts", [("chinese", ZH), ("japanese", JA), ("korean", KO),
                                         ("code", CODE)])
def test_other_scripts_and_code_are_never_underestimated_nor_absurdly_over(name, texts, smol):
    for estimate, tokens, text in ratios(texts, smol):
        assert tokens <= estimate <= 3 * tokens, (name, estimate, tokens, text)


def test_cjk_is_no_longer_counted_at_the_english_rate(smol):
    text = "".join(ZH + JA)
    old = len(text) // 2
    assert old < smol(text) / 3 < smol(text) <= estimate_tokens(text)


def test_whole_prompt_with_its_chat_template(english, smol):
    """The real use: the merge prompt of a group, counted as the server counts it (ChatML)."""
    groups = [[{"instruction": ZH[0], "input": "", "output": ZH[1]},
               {"instruction": ZH[3], "input": "", "output": ZH[4]}],
              [{"instruction": JA[0], "input": "", "output": JA[1]},
               {"instruction": JA[2], "input": "", "output": JA[3]}],
              [{"instruction": english[0], "input": "", "output": english[1]},
               {"instruction": english[2], "input": CODE[0], "output": english[3]}]]
    for group in groups:
        messages = build_messages(group)
        served = sum(smol(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n", special=True)
                     for m in messages) + smol("<|im_start|>assistant\n", special=True)
        assert served <= estimate_prompt_tokens(messages) <= 3 * served


def test_costs_stay_within_the_byte_bound():
    """No character costs more than its UTF-8 bytes (the most a byte-level BPE spends on it)."""
    for code in list(range(0x20, 0x3000, 7)) + list(range(0x3000, 0x10000, 97)) + [0x1F600, 0x20B9F]:
        if 0xD800 <= code <= 0xDFFF:
            continue
        ch = chr(code)
        assert 0 < char_cost(ch) <= len(ch.encode("utf-8")), hex(code)
    assert estimate_tokens("") == 0
    assert estimate_tokens("ab") == 1 and estimate_tokens("12") == 2 and estimate_tokens("睡眠") == 5
    assert estimate_tokens("é") == 2 and estimate_tokens("🙂") == 4
    messages = [{"role": "system", "content": "ab"}, {"role": "user", "content": None}]
    assert estimate_prompt_tokens(messages) == 1 + 2 * MESSAGE_OVERHEAD
