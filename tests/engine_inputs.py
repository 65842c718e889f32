"""Inputs of the engine tests, importable both by the tests and by the fresh processes they start (which run
outside the repository with nothing of `moca` importable)."""

from PIL import Image


def engine_inputs() -> tuple[list, dict[str, list]]:
    """(plain inputs, inputs per prompt name): each named prompt on the inputs it is meant for (`image_question`
    holds an image placeholder, so it takes text with an image; `image` and `document_page` take an image alone)."""
    red = Image.new("RGB", (112, 84), "red")
    green = Image.new("RGB", (56, 112), (20, 200, 90))
    plain = ["A red circle on a white background.", red,
             {"text": "Page 3 of the report <image> with a chart", "image": green},
             {"text": "Two images <image> and <image>", "image": [green, red]}]  # fmt: skip
    by_prompt = {
        "image_question": [{"text": "What colour is the shape?", "image": red}, {"text": "How tall is it?", "image": green}],
        "caption": ["a red square", "a green page"],
        "image": [red, green],
        "document_page": [green, red],
        "text": ["plain text", "more plain text"],
    }
    return plain, by_prompt
