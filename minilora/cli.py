def main() -> int:
    raise SystemExit("minilora: the command line is not built yet")
