"""picochat: ChatGPT from first principles, small enough to read in an afternoon."""

__version__ = "0.1.0"
