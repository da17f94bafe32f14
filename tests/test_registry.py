"""sources.toml: declarations validated per source, paths confined to the allowed roots."""

import os

import pytest

from pipelines.ingestion.sources.registry import SourceError, load_registry

GOOD = """
[sources.prices]
type = "file"
format = "csv"
path = "data/*.csv"
primary_key = ["id"]
[sources.prices.validation]
required_columns = ["id", "timestamp"]
data_types = { id = "string", timestamp = "datetime", px = "double" }
[sources.prices.mapping]
px = "value"
"""


def test_valid_declaration_is_read_with_defaults(tmp_path):
    (tmp_path / "sources.toml").write_text(GOOD)
    registry = load_registry(tmp_path / "sources.toml")
    source = registry.get("prices")
    assert source.enabled and source.dataset == "observations" and source.delimiter == ","
    assert source.validation.data_types == {"id": "string", "timestamp": "datetime", "px": "float"}
    assert source.dataset_column("value") == "px"
    assert registry.enabled() == ["prices"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ('type = "ftp"\npath = "x.csv"', "field 'type'"),
        ('type = "file"', "field 'path' is required"),
        ('type = "file"\npath = "a.csv"\nformat = "xml"', "field 'format'"),
        ('type = "file"\npath = "a.csv"\ncolour = "red"', "field 'colour': not a setting here"),
        ('type = "file"\npath = "a.csv"\ndelimeter = ";"', "field 'delimeter': not a setting here (did you mean "
                                                         "'delimiter'?)"),
        ('type = "file"\npath = "a.csv"\n[sources.bad.validation]\nrequired = ["id"]',
         "field 'validation.required': not a setting here (did you mean 'required_columns'?)"),
        ('type = "file"\npath = "a.csv"\nsep = ";"', "field 'sep': not a setting here (did you mean 'delimiter'?)"),
        ('type = "http"\nurl = "https://x.test"\npagination = { type = "page", page_param = "p" }',
         "field 'pagination.page_param': not a setting here (did you mean 'param'?)"),
        ('type = "file"\npath = "a.csv"\nencoding = "klingon"', "unknown encoding"),
        ('type = "file"\npath = "a.csv"\n[sources.bad.validation]\ndata_types = { a = "blob" }', "unknown type 'blob'"),
        ('type = "file"\npath = "a.csv"\n[sources.bad.mapping]\nx = "price"', "target must be one of"),
    ],
)
def test_bad_declaration_names_source_and_field_and_spares_the_others(tmp_path, body, expected):
    (tmp_path / "sources.toml").write_text(GOOD + "\n[sources.bad]\n" + body + "\n")
    registry = load_registry(tmp_path / "sources.toml")
    assert "prices" in registry.sources
    with pytest.raises(SourceError) as info:
        registry.get("bad")
    assert "source 'bad'" in str(info.value) and expected in str(info.value)


def test_unparsable_file_is_a_clear_error(tmp_path):
    (tmp_path / "sources.toml").write_text("[sources.x\n")
    with pytest.raises(SourceError, match="not valid TOML"):
        load_registry(tmp_path / "sources.toml")


@pytest.mark.parametrize("path", ["../outside/*.csv", "/etc/*", "data/../../*.csv"])
def test_paths_outside_the_roots_are_refused(tmp_path, path):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "sources.toml").write_text(f'[sources.x]\ntype = "file"\npath = "{path}"\n')
    registry = load_registry(tmp_path / "cfg" / "sources.toml")
    with pytest.raises(SourceError, match="outside the allowed data folders"):
        registry.get("x")


def test_links_out_of_the_roots_are_refused(tmp_path):
    cfg, outside = tmp_path / "cfg", tmp_path / "secret"
    (cfg / "data").mkdir(parents=True)
    outside.mkdir()
    (outside / "passwords.csv").write_text("id\n1\n")
    os.symlink(outside / "passwords.csv", cfg / "data" / "innocent.csv")
    (cfg / "sources.toml").write_text('[sources.x]\ntype = "file"\npath = "data/*.csv"\n')
    registry = load_registry(cfg / "sources.toml")
    with pytest.raises(SourceError, match="outside the allowed data folders"):
        registry.files(registry.get("x"))


def test_data_roots_extend_where_files_may_be_read(tmp_path):
    cfg, extra = tmp_path / "cfg", tmp_path / "extra"
    cfg.mkdir()
    extra.mkdir()
    (extra / "a.csv").write_text("id\n1\n")
    (cfg / "sources.toml").write_text(f'[sources.x]\ntype = "file"\npath = "{extra}/*.csv"\n')
    assert "x" in load_registry(cfg / "sources.toml").errors
    registry = load_registry(cfg / "sources.toml", [extra])
    assert registry.files(registry.get("x")) == [extra / "a.csv"]


def test_no_matching_file_is_a_clear_error(tmp_path):
    (tmp_path / "sources.toml").write_text('[sources.x]\ntype = "file"\npath = "nothing/*.csv"\n')
    registry = load_registry(tmp_path / "sources.toml")
    with pytest.raises(SourceError, match="no file matches"):
        registry.files(registry.get("x"))


@pytest.mark.parametrize("path", [".ingot/jwt_secret", ".ingot/*", ".ingot/exports/*.csv", "data/../.ingot/secret_key",
                                  "link/jwt_secret"])
def test_ingots_own_home_is_never_a_source_even_beside_sources_toml(tmp_path, path):
    home = tmp_path / ".ingot"
    (home / "exports").mkdir(parents=True)
    (home / "jwt_secret").write_text("not for sources\n")
    (home / "exports" / "job_x.csv").write_text("id\n1\n")
    (tmp_path / "data").mkdir()
    os.symlink(home, tmp_path / "link")  # a link into the home is followed to where it leads
    (tmp_path / "sources.toml").write_text(f'[sources.x]\ntype = "file"\nformat = "csv"\npath = "{path}"\n')
    registry = load_registry(tmp_path / "sources.toml", home=home)
    with pytest.raises(SourceError, match="outside the allowed data folders|no file matches"):
        registry.files(registry.get("x"))


def test_a_wide_glob_passes_over_ingots_home(tmp_path):
    home = tmp_path / "state"  # not hidden: a glob would otherwise pass over it by itself
    (home / "exports").mkdir(parents=True)
    (home / "exports" / "job_x.csv").write_text("id\n1\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.csv").write_text("id\n1\n")
    (tmp_path / "sources.toml").write_text('[sources.x]\ntype = "file"\nformat = "csv"\npath = "**/*.csv"\n')
    registry = load_registry(tmp_path / "sources.toml", home=home)
    assert registry.files(registry.get("x")) == [tmp_path / "data" / "a.csv"]
