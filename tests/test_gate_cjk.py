"""Item 9 of issue 30: the merge gate on Chinese and Japanese merges, judged with the real MiniLM
encoder exactly as the merge stage judges (``BatchGate`` over the embed stage's ``encode_texts``).

Each group holds two related examples written for this project and a merge a careful person
would write: one task that asks for both, one output that answers both, reworded, nothing of
either left out. The crude merges derived from each group must fail: the other source dropped
from the output, a merge of one source alone, the good merge's output cut mid-sentence, and the
good merge of another group (unrelated).
"""
from __future__ import annotations

import asyncio

import pytest

from mergeit_spark.config import load_settings
from mergeit_spark.llm.gate import (BatchGate, GroupSources, complete_ending, content_words,
                                    distinctive_recall, embedding_text, model_encoder)


def ex(instruction: str, output: str, input: str = "") -> dict:  # noqa: A002
    return {"instruction": instruction, "input": input, "output": output}


# name -> (source a, source b, good merge, merge of source a alone)
GROUPS: dict[str, tuple[dict, dict, dict, dict]] = {
    "zh-health": (
        ex("列出三条保持健康的建议。",
           "1. 均衡饮食，多吃蔬菜和水果。2. 每周至少运动三次，每次三十分钟。3. 保证每晚七到八小时的睡眠。"),
        ex("解释为什么睡眠对健康很重要。",
           "睡眠时身体会修复受损的组织，大脑会整理和巩固白天的记忆。长期睡眠不足会削弱免疫力，让人更容易生病，"
           "也会影响注意力和情绪。"),
        ex("列出三条保持健康的建议，并解释为什么睡眠对健康特别重要。",
           "1. 均衡饮食：多吃蔬菜、水果和全谷物，为身体提供所需的营养。\n"
           "2. 规律运动：每周至少运动三次，每次三十分钟，可以增强心肺功能。\n"
           "3. 保证充足的睡眠：每晚睡七到八小时。睡眠之所以重要，是因为身体在睡眠时修复受损的组织，"
           "大脑也在整理和巩固白天的记忆；长期睡眠不足会削弱免疫力，让人更容易生病，还会影响注意力和情绪。"),
        ex("请给出三条保持身体健康的建议。",
           "第一，饮食要均衡，多吃蔬菜和水果；第二，每周运动三次以上，每次半小时；第三，每晚保证七到八小时的睡眠。"),
    ),
    "zh-great-wall": (
        ex("简要介绍长城的历史。",
           "长城始建于春秋战国时期，各诸侯国为了防御而修筑城墙。秦始皇统一中国后，把各国的城墙连接起来。"
           "今天人们看到的大部分长城是明朝修建的。"),
        ex("说明长城在古代的主要作用。",
           "长城主要用来抵御北方游牧民族的侵袭。城墙上的烽火台可以迅速传递军情，关口也便于控制贸易和人员往来。"),
        ex("简要介绍长城的历史，并说明它在古代起到的主要作用。",
           "长城始建于春秋战国时期，当时各诸侯国为了防御而修筑城墙；秦始皇统一中国后，把这些城墙连接起来，"
           "今天人们看到的大部分长城则是明朝修建的。在古代，长城主要用来抵御北方游牧民族的侵袭：城墙上的烽火台"
           "可以迅速传递军情，关口也便于控制贸易和人员往来。"),
        ex("请简单讲一讲长城的历史。",
           "长城最早修建于春秋战国时期，用来防御邻国。秦朝统一后，秦始皇把各国的城墙连成一体。"
           "现在保存下来的长城大多是明朝修建的。"),
    ),
    "zh-python": (
        ex("用Python写一个函数，判断一个字符串是否是回文。",
           "def is_palindrome(s):\n    s = s.lower()\n    return s == s[::-1]\n\n"
           "这个函数先把字符串转成小写，再和它的反转进行比较，相同就是回文。"),
        ex("用Python写一个函数，统计字符串中每个字符出现的次数。",
           "def count_chars(s):\n    counts = {}\n    for ch in s:\n        counts[ch] = counts.get(ch, 0) + 1\n"
           "    return counts\n\n函数遍历字符串，用字典记录每个字符出现的次数。"),
        ex("用Python写两个函数：一个判断字符串是否是回文，另一个统计字符串中每个字符出现的次数，并分别说明思路。",
           "def is_palindrome(s):\n    s = s.lower()\n    return s == s[::-1]\n\n"
           "def count_chars(s):\n    counts = {}\n    for ch in s:\n        counts[ch] = counts.get(ch, 0) + 1\n"
           "    return counts\n\n"
           "is_palindrome 先把字符串转成小写，再和它的反转进行比较，相同就是回文；"
           "count_chars 遍历字符串，用字典记录每个字符出现的次数。"),
        ex("写一个Python函数，检查字符串是不是回文。",
           "def is_palindrome(text):\n    text = text.lower()\n    return text == text[::-1]\n\n"
           "先转成小写，再与反转后的字符串比较，两者相同就是回文。"),
    ),
    "ja-health": (
        ex("健康を保つための三つのコツを挙げてください。",
           "1. バランスの良い食事をとる。2. 毎日適度に運動する。3. 十分な睡眠をとる。"),
        ex("睡眠が健康にとってなぜ大切なのかを説明してください。",
           "睡眠中に体は傷ついた組織を修復し、脳は一日の記憶を整理します。睡眠不足が続くと免疫力が下がり、"
           "集中力も落ちてしまいます。"),
        ex("健康を保つための三つのコツを挙げ、特に睡眠がなぜ大切なのかを説明してください。",
           "1. バランスの良い食事をとる：野菜や果物をしっかり食べ、体に必要な栄養を補います。\n"
           "2. 毎日適度に運動する：心臓や筋肉が強くなり、気分も明るくなります。\n"
           "3. 十分な睡眠をとる：睡眠中に体は傷ついた組織を修復し、脳は一日の記憶を整理します。"
           "睡眠不足が続くと免疫力が下がり、集中力も落ちてしまうため、睡眠は健康の土台といえます。"),
        ex("健康でいるためのコツを三つ教えてください。",
           "一つ目は栄養のバランスが取れた食事、二つ目は毎日の適度な運動、三つ目はしっかり眠ることです。"),
    ),
    "ja-fuji": (
        ex("富士山について簡単に紹介してください。",
           "富士山は静岡県と山梨県にまたがる日本一高い山で、標高は3776メートルです。"
           "2013年に世界文化遺産に登録されました。"),
        ex("富士山に登るときの注意点を教えてください。",
           "登山に適した時期は7月から9月です。山頂付近は夏でも気温が低いので、防寒着を持っていきましょう。"
           "高山病を防ぐため、ゆっくり登り、こまめに水分をとることが大切です。"),
        ex("富士山について簡単に紹介し、登るときの注意点も教えてください。",
           "富士山は静岡県と山梨県にまたがる日本一高い山で、標高は3776メートル、2013年には世界文化遺産に"
           "登録されました。登るなら、登山に適した7月から9月にしましょう。山頂付近は夏でも気温が低いので"
           "防寒着が必要です。また、高山病を防ぐためにゆっくり登り、こまめに水分をとることが大切です。"),
        ex("富士山とはどんな山ですか。",
           "静岡県と山梨県の境にある日本で最も高い山で、高さは3776メートルです。"
           "2013年に世界文化遺産になりました。"),
    ),
    "ja-tokyo": (
        ex("次の文章を要約してください。",
           "東京は日本の首都で、約1400万人が暮らす経済・文化・政治の中心地です。",
           "東京は日本の首都であり、人口は約1400万人です。経済、文化、政治の中心地として知られ、"
           "多くの企業や大学が集まっています。"),
        ex("次の文を英語に翻訳してください。", "Tokyo is the capital of Japan.", "東京は日本の首都です。"),
        ex("次の文章を要約し、その要約を英語に翻訳してください。",
           "要約：東京は日本の首都で、約1400万人が暮らす経済・文化・政治の中心地です。\n"
           "英訳：Tokyo is the capital of Japan, a centre of the economy, culture and politics where about "
           "14 million people live.",
           "東京は日本の首都であり、人口は約1400万人です。経済、文化、政治の中心地として知られ、"
           "多くの企業や大学が集まっています。"),
        ex("次の文章を短くまとめてください。",
           "東京は約1400万人が住む日本の首都で、経済や文化、政治の中心です。",
           "東京は日本の首都であり、人口は約1400万人です。経済、文化、政治の中心地として知られ、"
           "多くの企業や大学が集まっています。"),
    ),
}


def cut(text: str, share: float = 0.45) -> str:
    """The text cut at ``share`` of its length, mid-sentence: no sentence end right before."""
    at = int(len(text) * share)
    while complete_ending(text[:at]):
        at += 1
    return text[:at]


def variants(name: str) -> dict[str, dict]:
    a, b, good, single = GROUPS[name]
    same_language = [n for n in GROUPS if n[:2] == name[:2]]
    far = GROUPS[same_language[(same_language.index(name) + 1) % len(same_language)]][2]
    return {
        "good": good,
        "drop_answer": dict(good, output=single["output"]),
        "single": single,
        "truncated": dict(good, output=cut(good["output"])),
        "unrelated": far,   # the good merge of another group in the same language
    }


@pytest.fixture(scope="module")
def verdicts():
    """Every variant of every group, judged in one batch by the real gate."""
    settings = load_settings(env={})
    encode = model_encoder(settings.embed)
    items = []
    for name, (a, b, good, single) in GROUPS.items():
        sources = [a, b]
        vectors = encode([embedding_text(s["instruction"], s["input"]) for s in sources])
        group = GroupSources(sources, vectors)
        items += [(f"{name}/{kind}", merged, group) for kind, merged in variants(name).items()]

    async def go():
        gate = BatchGate(encode, settings.gate)
        return await asyncio.gather(*(gate.judge(merged, group) for _, merged, group in items))

    return dict(zip([name for name, _, _ in items], asyncio.run(go())))


def test_content_words_of_unspaced_scripts_are_character_bigrams():
    assert content_words("保持健康") == {"保持", "持健", "健康"}
    assert content_words("用Python写函数，约1400万人") == {"用", "python", "写函", "函数", "约", "1400", "万人"}
    assert content_words("健康を保つ") == {"健康", "康を", "を保", "保つ"}
    assert {"กร", "รุ", "ุง"} <= content_words("กรุงเทพ")
    # words of scripts with combining vowel signs stay whole (Devanagari)
    assert content_words("नींद स्वास्थ्य के लिए") == {"नींद", "स्वास्थ्य", "लिए"}
    # a reworded Chinese merge keeps most of what each source said only itself
    a, b, good, _ = GROUPS["zh-health"]
    recall = distinctive_recall(content_words(good["output"]),
                                [content_words(a["output"]), content_words(b["output"])])
    assert recall.min() > 0.6


@pytest.mark.parametrize("ending", ["好。", "好！", "好？", "好…", "「はい」", "『本』", "（注）", "完了．",
                                    "नमस्ते।", "॥", "مرحبا؟", "تمام۔", "Բարեւ։", "ሰላም።", "ሰላም፧",
                                    "ကောင်း။", "សួស្តី។", "Конец.", "„Ende“", "«fin»", "❤️",
                                    "สวัสดีครับ"])
def test_sentence_ends_of_every_script(ending):
    assert complete_ending(ending)


@pytest.mark.parametrize("cut_text", ["睡眠让身体修复组织，", "睡眠让身体修复", "健康を保つための", "睡眠中に体は、",
                                      "नींद स्वास्थ्य", "مرحبا بك،", "Конец и"])
def test_cut_text_is_not_an_end(cut_text):
    assert not complete_ending(cut_text)


def test_sentence_terminals_match_unicode():
    regex = pytest.importorskip("regex")
    from mergeit_spark.llm.gate import SENTENCE_TERMINALS
    pattern = regex.compile(r"\p{Sentence_Terminal}")
    assert SENTENCE_TERMINALS == {chr(c) for c in range(0x110000) if pattern.match(chr(c))}


@pytest.mark.parametrize("name", list(GROUPS))
def test_a_careful_merge_is_accepted(verdicts, name):
    verdict = verdicts[f"{name}/good"]
    assert verdict.passed, (verdict.failed, verdict.describe())


@pytest.mark.parametrize("name", list(GROUPS))
@pytest.mark.parametrize("kind, checks", [("drop_answer", {"output_coverage"}),
                                          ("single", {"request_coverage", "output_coverage"}),
                                          ("truncated", {"output_complete"})])
def test_a_crude_merge_is_rejected(verdicts, name, kind, checks):
    verdict = verdicts[f"{name}/{kind}"]
    assert not verdict.passed and set(verdict.failed) & checks, verdict.describe()


@pytest.mark.parametrize("name", list(GROUPS))
def test_an_unrelated_merge_is_rejected_by_the_word_checks(verdicts, name):
    """MiniLM is an English model: unrelated Chinese or Japanese texts still reach cosine 0.4-0.6
    to each other, above ``gate.min_source_similarity``, so here it is the coverage checks that
    refuse a merge about something else."""
    verdict = verdicts[f"{name}/unrelated"]
    assert not verdict.passed
    assert {"request_coverage", "output_coverage"} <= set(verdict.failed), verdict.describe()
