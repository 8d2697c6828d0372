from bundle.schedules import AuthorsLinearDecay


def test_authors_lr_decay():
    f = AuthorsLinearDecay(total_iterations=100_000, decay_iterations=50_000, update_every=1000)
    assert f(0) == 1.0 and f(50_999) == 1.0
    assert f(51_000) == 1 - 1 / 50_000
    assert abs(f(100_000) - (1 - 50 / 50_000)) < 1e-12  # practically constant, as in the authors' code
    assert AuthorsLinearDecay(100, 0)(100) == 1.0
