"""The one exception type paramreg raises for bad input."""


class ParamregError(ValueError):
    """Bad input to a paramreg function.

    The message says what was wrong, where (the parameter's canonical name and shape, or the
    pattern), what was given, what was expected and how to fix it. The model is left unchanged.
    """
