"""What the tests share: checkpoint writers, tokenizer folders, fixtures' builders and the repository's paths.

Imported as `from helpers.checkpoints import ...`: tests/conftest.py sits in tests/, so pytest puts tests/ on
sys.path. No test module imports another test module; a name two test files need lives here.
"""
