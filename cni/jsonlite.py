"""json.loads / json.dumps for the plugin, without importing the json package.

`import json` compiles regular expressions at import time (it pulls in `re` and `enum`): ~9 ms, paid
on every exec of the plugin, about as long as the reference plugin's whole ADD. The parsing and
encoding themselves are done by CPython's C accelerator `_json` either way; this module calls it
directly, with the same settings json.loads/json.dumps use by default. Elsewhere, the json package.
"""
try:
    from _json import encode_basestring_ascii, make_encoder, make_scanner
except ImportError:  # not CPython: the real thing
    from json import dumps, loads  # noqa: F401
else:
    _WHITESPACE = " \t\n\r"

    class _Decoding:
        """The attributes the C scanner reads from a json.JSONDecoder."""
        strict = True
        object_hook = None
        object_pairs_hook = None
        parse_float = float
        parse_int = int
        parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}.__getitem__
        memo: dict = {}

    _scan = make_scanner(_Decoding())
    _encode = make_encoder(None, None, encode_basestring_ascii, None, ": ", ", ", False, False, True)

    def loads(text) -> object:
        """Parse one JSON document; ValueError (naming the position) when it is not one."""
        if isinstance(text, (bytes, bytearray)):
            text = text.decode()   # utf-8 (already loaded); "utf-8-sig" would load its codec
            text = text[1:] if text[:1] == "\ufeff" else text
        start = len(text) - len(text.lstrip(_WHITESPACE))
        try:
            value, end = _scan(text, start)
            if not text[end:].strip(_WHITESPACE):
                return value
        except (StopIteration, SystemError):
            pass  # the C scanner builds its error from json.decoder, which is not loaded
        # Not JSON: only now pay for the json package, for its precise JSONDecodeError (a ValueError).
        import json
        return json.loads(text)

    def dumps(value) -> str:
        return "".join(_encode(value, 0))
