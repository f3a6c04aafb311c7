"""Reading a project's labeling config: the controls labelgate needs, or a clear refusal."""
from __future__ import annotations

import pytest

from pipelines import labelconfig
from pipelines.labelconfig import UnsupportedConfig, chosen, label_config, parse


def test_generated_config_round_trips():
    cfg = parse(label_config(("cat", "dog", "a & b")))
    assert (cfg.choices_name, cfg.image_name, cfg.image_key) == ("label", "image", "image")
    assert cfg.classes == ("cat", "dog", "a & b") and len(cfg.sha256) == 64


def test_a_users_own_control_names_and_data_key_are_read():
    xml = ('<View><Header value="Pick one"/><Image name="photo" value="$img_url" zoom="true"/>'
           '<Choices name="species" toName="photo" choice="single-radio">'
           '<Choice value="oak"/><Choice value="pine"/></Choices>'
           '<TextArea name="note" toName="photo"/></View>')
    cfg = parse(xml)
    assert (cfg.choices_name, cfg.image_name, cfg.image_key) == ("species", "photo", "img_url")
    assert cfg.classes == ("oak", "pine")
    result = labelconfig.choice_result("pine", cfg)
    assert result[0]["from_name"] == "species" and result[0]["to_name"] == "photo"
    assert chosen(result, "species") == "pine" and chosen(result, "label") is None


@pytest.mark.parametrize("xml,match", [
    ('<View><Text name="t" value="$text"/><Choices name="c" toName="t"><Choice value="a"/>'
     '</Choices></View>', "0 <Image>"),
    ('<View><Image name="a" value="$a"/><Image name="b" value="$b"/><Choices name="c" '
     'toName="a"><Choice value="x"/></Choices></View>', "2 <Image>"),
    ('<View><Image name="i" value="$i"/><Choices name="c" toName="i" choice="multiple">'
     '<Choice value="x"/></Choices></View>', "multi-label"),
    ('<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i"><Label '
     'value="x"/></RectangleLabels></View>', "0 <Choices>"),
    ('<View><Image name="i" value="$i"/><Choices name="c" toName="i"><Choice value="x"/>'
     '</Choices><Choices name="d" toName="i"><Choice value="y"/></Choices></View>', "2 <Choices>"),
    ('<View><Image name="i" value="i"/><Choices name="c" toName="i"><Choice value="x"/>'
     '</Choices></View>', "value=\"\\$key\""),
    ('<View><Image name="i" value="$i"/><Choices name="c" toName="i"><Choice value="x"/>'
     '<Choice value="x"/></Choices></View>', "distinct"),
    ('<View><Image', "not valid XML"),
    ('<!DOCTYPE v [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
     '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">'
     '<!ENTITY e "&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;"><!ENTITY f "&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;">'
     '<!ENTITY g "&f;&f;&f;&f;&f;&f;&f;&f;&f;&f;"><!ENTITY h "&g;&g;&g;&g;&g;&g;&g;&g;&g;&g;">]>'
     '<View><Image name="i" value="$i"/><Choices name="c" toName="i"><Choice value="&h;"/>'
     '</Choices></View>', "not valid XML"),  # a billion laughs: refused, not expanded
])
def test_configs_labelgate_cannot_train_on_say_what_is_supported(xml, match):
    with pytest.raises(UnsupportedConfig, match=match) as err:
        parse(xml)
    assert "Choices" in str(err.value) or "XML" in str(err.value)


@pytest.mark.parametrize("xml,match", [
    ('<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i"><Label '
     'value="x"/></RectangleLabels></View>', "RectangleLabels>: object detection"),
    ('<View><Image name="i" value="$i"/><Choices name="c" toName="i"></Choices></View>',
     "no <Choice"),
])
def test_refusals_name_the_task_found_and_an_empty_class_list(xml, match):
    with pytest.raises(UnsupportedConfig, match=match) as err:
        parse(xml)
    assert "labelgate supports image classification" in str(err.value)


@pytest.mark.parametrize("old,new,words", [
    (("rust", "healthy leaf"), ("rust", "healthy leaf", "leaf spot/blight"),
     "added ['leaf spot/blight']"),
    (("rust", "healthy leaf", "mosaic"), ("rust", "mosaic"), "removed ['healthy leaf']"),
    (("rust", "healthy leaf"), ("rust", "healthy leaf/ok"),
     "renamed 'healthy leaf' -> 'healthy leaf/ok'"),
    (("a", "b", "c"), ("c", "a", "b"), "the same names in another order"),
])
def test_a_class_list_change_is_told_in_words(old, new, words):
    change = labelconfig.class_change(old, new)
    assert change.changed and words in change.describe()
    assert labelconfig.class_change(old, old).describe() == "no change"
    assert not labelconfig.class_change(old, old).changed
