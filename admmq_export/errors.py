"""One exception type for bad input: a message naming the problem and the fix."""


class UserError(Exception):
    """Bad input. The CLI prints `error: <problem>. Fix: <fix>` on one line and exits non-zero."""

    def __init__(self, problem: str, fix: str = ""):
        self.problem = problem
        self.fix = fix
        super().__init__(self.line())

    def line(self) -> str:
        text = f"error: {self.problem}"
        return f"{text}. Fix: {self.fix}" if self.fix else text
