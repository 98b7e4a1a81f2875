"""Markdown to Slack mrkdwn: a table of conversions (hermes 0.19.0's format_message rules)."""

import pytest

from hermes_twisted.platforms.slack.mrkdwn import to_mrkdwn

CASES = [
    ("plain text", "plain text"),
    ("**bold**", "*bold*"),
    ("__bold__", "*bold*"),
    ("*italic*", "_italic_"),
    ("_italic_", "_italic_"),
    ("***both***", "*_both_*"),
    ("~~gone~~", "~gone~"),
    ("a **b** and *c* d", "a *b* and _c_ d"),
    ("# Title", "*Title*"),
    ("### Sub **title** ###", "*Sub title*"),
    ("[docs](https://example.org/a?b=1&c=2)", "<https://example.org/a?b=1&c=2|docs>"),
    ("see <https://example.org>", "see <https://example.org>"),
    ("hi <@U123> in <#C42> <!here>", "hi <@U123> in <#C42> <!here>"),
    ("1 < 2 && 3 > 2", "1 &lt; 2 &amp;&amp; 3 &gt; 2"),
    ("> quoted\nnot > this", "> quoted\nnot &gt; this"),
    ("`a **b** <c>`", "`a **b** &lt;c&gt;`"),
    ("```python\nx = *y* < 2\n```", "```x = *y* &lt; 2\n```"),
    ("* item one\n* item two", "* item one\n* item two"),
    ("2 * 3 * 4", "2 * 3 * 4"),
    ("snake_case_name", "snake_case_name"),
    ("# [link](https://x.org) head", "*<https://x.org|link> head*"),
    ("**bold [l](https://x.org)**", "*bold <https://x.org|l>*"),
]


@pytest.mark.parametrize("markdown, mrkdwn", CASES)
def test_conversion(markdown, mrkdwn):
    assert to_mrkdwn(markdown) == mrkdwn


def test_control_characters_in_input_cannot_forge_placeholders():
    assert to_mrkdwn("a\x000\x00b \x01x\x01") == "a0b x"
