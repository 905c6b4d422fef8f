import pytest

from parity import ParityFixture, parity_fixture


@pytest.fixture(scope="session")
def oracle() -> ParityFixture:
    return parity_fixture()
