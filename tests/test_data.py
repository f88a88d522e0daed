import warnings

from datasets import Dataset, Features, Value
from datasets import Image as ImageFeature

from trl_unigame.data import check_rows


def numeric_rows(vqa, answer_type="int64"):
    rows = vqa.select(range(8)).to_dict()
    answers = [i % 3 for i in range(8)]
    if answer_type == "float64":
        answers = [float(a) for a in answers]
    features = Features({"image": ImageFeature(), "question": Value("string"), "answer": Value(answer_type)})
    return Dataset.from_dict(
        {"image": rows["image"], "question": rows["question"], "answer": answers}, features=features
    )


def caught_warnings(dataset, name="train_dataset"):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_rows(dataset, name)
    return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_an_integer_answer_column_is_converted_to_text_with_one_warning(vqa):
    messages = caught_warnings(numeric_rows(vqa))
    assert len(messages) == 1
    assert "`train_dataset` has numbers where text is expected" in messages[0]
    assert "`answer` (row 0: 0 is read as '0')" in messages[0] and "converted to text" in messages[0]
    assert 'cast_column("answer", datasets.Value("string"))' in messages[0]
    assert "`question`" not in messages[0]


def test_a_float_answer_says_the_text_it_becomes(vqa):
    (message,) = caught_warnings(numeric_rows(vqa, "float64"), "eval_dataset")
    assert message.startswith("`eval_dataset` has numbers") and "row 0: 0.0 is read as '0.0'" in message


def test_text_answers_warn_nothing(vqa):
    assert caught_warnings(numeric_rows(vqa).cast_column("answer", Value("string"))) == []
