"""The string expansion engine: items, operators, conditions, errors, scoping."""

import time

import pytest
from hypothesis import given, settings, strategies as st

from mta.expand import (
    DictContext,
    ExpansionError,
    ExpansionForcedFail,
    compile_expansion,
)
from mta.lists import NamedLists
from mta.lookups import LookupCache

VARIABLES = {
    "local_part": "Post.Master",
    "domain": "Example.COM",
    "x": "7",
    "empty": "",
    "sender_host_address": "192.0.2.7",
    "acl_m_count": "12",
    "acl_c0": "zero",
}


@pytest.fixture
def ctx():
    return DictContext(VARIABLES, LookupCache(recheck_interval=0.0))


def expand(text, context=None):
    return compile_expansion(text).expand(context or DictContext(VARIABLES))


# -- constants, variables, escapes ------------------------------------------------

def test_plain_text_is_constant():
    compiled = compile_expansion("just text {with} braces: and colons")
    assert compiled.is_constant
    assert compiled.constant_value == "just text {with} braces: and colons"
    assert compiled.expand(DictContext()) == "just text {with} braces: and colons"


def test_constant_folding_of_operators():
    compiled = compile_expansion("${lc:ABC}\\t")
    assert compiled.is_constant and compiled.constant_value == "abc\t"


def test_variables_both_forms():
    assert expand("$local_part@${domain}") == "Post.Master@Example.COM"
    assert expand("${x}1 $x.") == "71 7."
    assert expand("$acl_m_count/$acl_c0") == "12/zero"


def test_variable_name_runs_to_last_name_character():
    with pytest.raises(ExpansionError, match='unknown variable name "xyz"'):
        expand("$xyz")
    with pytest.raises(ExpansionError, match='unknown variable name "x_1"'):
        expand("$x_1")


def test_unknown_variable_in_untaken_branch_is_not_an_error():
    assert expand("${if eq{a}{a}{ok}{$nosuch}}") == "ok"


@pytest.mark.parametrize("text, expected", [
    ("a\\nb", "a\nb"),
    ("a\\tb", "a\tb"),
    ("a\\rb", "a\rb"),
    ("\\\\", "\\"),
    ("\\$x", "$x"),
    ("\\{\\}", "{}"),
    ("\\101\\x42", "AB"),
    ("\\q", "q"),
    ("\\N$x ${ \\\\ }\\N!", "$x ${ \\\\ }!"),
    ("\\N$unterminated", "$unterminated"),
    ("trailing\\", "trailing\\"),
])
def test_escapes(text, expected):
    assert expand(text) == expected


def test_numeric_variables_are_empty_outside_match():
    assert expand("[$1][${2}]") == "[][]"


# -- operators ---------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("${lc:$domain}", "example.com"),
    ("${uc:$local_part}", "POST.MASTER"),
    ("${length_3:abcdef}", "abc"),
    ("${l_10:abc}", "abc"),
    ("${substr_1_2:abcdef}", "bc"),
    ("${substr_2:abcdef}", "cdef"),
    ("${s_-1:abcde}", "abcd"),
    ("${strlen:$local_part}", "11"),
    ("${mask:10.111.131.206/28}", "10.111.131.192/28"),
    ("${mask:3ffe:ffff:836f:0a00:000a:0800:200a:c031/99}",
     "3ffe.ffff.836f.0a00.000a.0800.2000.0000/99"),
    ("${mask_n:2001:db8::1/32}", "2001:db8::/32"),
    ('${quote:ab"*"cd}', '"ab\\"*\\"cd"'),
    ("${quote:a_b.c-d}", "a_b.c-d"),
    ("${quote:}", '""'),
    ("${quote:a\\nb}", '"a\\nb"'),
    ("${domain:Fred <fred@Example.com>}", "Example.com"),
    ("${local_part:fred@example.com}", "fred"),
    ("${address:Chief <ceo@up.stairs> (boss)}", "ceo@up.stairs"),
    ("${address:not an address}", ""),
    ("${domain:unqualified}", ""),
    ("${md5:abc}", "900150983cd24fb0d6963f7d28e17f72"),
    ("${sha256:}", "E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855"),
    ("${base64:hello}", "aGVsbG8="),
    ("${base64d:aGVsbG8=}", "hello"),
    ("${rxquote:a.b}", "a\\.b"),
    ("${listcount:a:b::c}", "2"),
    ("${reverse_ip:192.0.2.4}", "4.2.0.192"),
])
def test_operators(text, expected):
    assert expand(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("${eval:1+1}", "2"),
    ("${eval:1+2*3}", "7"),
    ("${eval:(1+2)*3}", "9"),
    ("${eval:2+42%5}", "4"),
    ("${eval:0xc&5}", "4"),
    ("${eval:0xc|5}", "13"),
    ("${eval:0xc^5}", "9"),
    ("${eval:0xc>>1}", "6"),
    ("${eval:0xc<<1}", "24"),
    ("${eval:~255&0x1234}", "4608"),
    ("${eval:-(~255&0x1234)}", "-4608"),
    ("${eval:-7/2}", "-3"),
    ("${eval:-7%2}", "-1"),
    ("${eval:010}", "8"),
    ("${eval10:010}", "10"),
    ("${eval:2K}", "2048"),
    ("${eval: $x * 2 }", "14"),
])
def test_eval(text, expected):
    assert expand(text) == expected


@pytest.mark.parametrize("text", [
    "${eval:1/0}", "${eval:1+}", "${eval:(1}", "${eval:1 2}", "${eval:9223372036854775807+1}",
    "${eval10:0x10}", "${eval:1<<64}",
])
def test_eval_errors(text):
    with pytest.raises(ExpansionError, match="expression evaluation|overflow"):
        expand(text)


def test_bad_operator_argument_fails_at_expansion_time():
    assert expand("${if eq{a}{b}{${mask:nonsense}}{fine}}") == "fine"
    with pytest.raises(ExpansionError, match="not an IP address"):
        expand("${if eq{a}{a}{${mask:nonsense}}{fine}}")


# -- items ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("${substr{3}{2}{$local_part}}", "t."),
    ("${substr{-5}{2}{1234567}}", "34"),
    ("${substr{-5}{2}{12}}", ""),
    ("${substr{-3}{2}{12}}", "1"),
    ("${substr{-1}{abcde}}", "abcd"),
    ("${substr{9}{abc}}", ""),
    ("${length{2}{abc}}", "ab"),
    ("${sg{abcdefabcdef}{abc}{xyz}}", "xyzdefxyzdef"),
    ("${sg{abcdef}{^(...)(...)\\$}{\\$2\\$1}}", "defabc"),
    ("${sg{1=A 4=D 3=C}{\\N(\\d+)=\\N}{K\\$1=}}", "K1=A K4=D K3=C"),
    ("${tr{abcdea}{ac}{13}}", "1b3de1"),
    ("${tr{abc}{abc}{x}}", "xxx"),
    ("${tr{abc}{a}{}}", "abc"),
])
def test_items(text, expected):
    assert expand(text) == expected


def test_sg_with_dynamic_regex():
    context = DictContext({"re": "b+"})
    assert compile_expansion("${sg{abbbc}{$re}{-}}").expand(context) == "a-c"


def test_length_rejects_negative():
    with pytest.raises(ExpansionError):
        expand("${length{-1}{abc}}")


# -- conditions -----------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("${if eq{$x}{7}{yes}{no}}", "yes"),
    ("${if eq {$x} {8} {yes} {no} }", "no"),
    ("${if eqi{$domain}{example.com}{yes}{no}}", "yes"),
    ("${if !eq{a}{b}{yes}{no}}", "yes"),
    ("${if ! ! eq{a}{b}{yes}{no}}", "no"),
    ("${if eq{a}{b}{yes}}", ""),
    ("${if eq{a}{a}}", "true"),
    ("${if eq{a}{b}}", ""),
    ("${if >{$x}{5}{big}{small}}", "big"),
    ("${if >{10M}{$acl_m_count}{y}{n}}", "y"),
    ("${if <{-1}{0}{y}{n}}", "y"),
    ("${if <={7}{$x}{y}{n}}", "y"),
    ("${if >={6}{$x}{y}{n}}", "n"),
    ("${if =={0}{$empty}{y}{n}}", "y"),
    ("${if ={1K}{1024}{y}{n}}", "y"),
    ("${if def:x{d}{u}}", "d"),
    ("${if def:empty{d}{u}}", "u"),
    ("${if def:value{d}{u}}", "u"),
    ("${if lt{abc}{abd}{y}{n}}", "y"),
    ("${if gei{B}{a}{y}{n}}", "y"),
    ("${if isip{192.0.2.1}{y}{n}}", "y"),
    ("${if isip{::1}{y}{n}}", "y"),
    ("${if isip{host.example}{y}{n}}", "n"),
    ("${if isip4{192.0.2.1}{y}{n}}", "y"),
    ("${if isip4{::1}{y}{n}}", "n"),
    ("${if isip6{::ffff:1.2.3.4}{y}{n}}", "y"),
    ("${if isip{999.1.1.1}{y}{n}}", "n"),
    ("${if bool{ Yes }{y}{n}}", "y"),
    ("${if bool{0}{y}{n}}", "n"),
    ("${if bool{}{y}{n}}", "n"),
    ("${if bool_lax{00}{y}{n}}", "y"),
    ("${if bool_lax{no}{y}{n}}", "n"),
    ("${if and{{eq{a}{a}}{>={10}{9}}}{ok}{bad}}", "ok"),
    ("${if and{ {eq{a}{a}} {eq{a}{b}} }{ok}{bad}}", "bad"),
    ("${if or{{eq{a}{b}}{isip{::1}}}{ok}{bad}}", "ok"),
    ("${if or{}{ok}{bad}}", "bad"),
    ("${if and{}{ok}{bad}}", "ok"),
    ("${if inlist{b}{a:b:c}{$value}{no}}", "b"),
    ("${if inlist{B}{a:b:c}{$value}{no}}", "no"),
    ("${if inlisti{B}{a:b:c}{$value}{no}}", "b"),
])
def test_conditions(text, expected):
    assert expand(text) == expected


def test_exists(tmp_path):
    path = tmp_path / "present"
    path.write_text("")
    assert expand(f"${{if exists{{{path}}}{{y}}{{n}}}}") == "y"
    assert expand(f"${{if exists{{{tmp_path}/absent}}{{y}}{{n}}}}") == "n"


def test_bool_rejects_garbage():
    with pytest.raises(ExpansionError, match="unrecognised boolean"):
        expand("${if bool{maybe}}")


def test_numeric_comparison_rejects_non_numbers():
    with pytest.raises(ExpansionError, match='"abc" is not a number'):
        expand("${if >{abc}{1}}")


def test_def_of_unknown_variable_fails():
    with pytest.raises(ExpansionError, match="unknown variable"):
        expand("${if def:nosuch{y}{n}}")


def test_match_sets_numeric_variables_only_inside_if():
    text = "${if match{abc123}{\\N^([a-z]+)(\\d+)$\\N}{$2-$1-$0}{no}}[$1]"
    assert expand(text) == "123-abc-abc123[]"


def test_match_is_unanchored_and_case_sensitive():
    assert expand("${if match{xxABC}{B}{y}{n}}") == "y"
    assert expand("${if match{xxABC}{b}{y}{n}}") == "n"


def test_or_keeps_groups_of_first_successful_match():
    text = "${if or{{match{ab}{(x)}}{match{ab}{(b)}}{match{ab}{(a)}}}{$1}}"
    assert expand(text) == "b"


def test_nested_if_restores_outer_groups():
    text = ("${if match{outer}{(out)}"
            "{${if match{inner}{(inn)}{$1}}-$1}}")
    assert expand(text) == "inn-out"


def test_fail_keyword_forces_failure():
    with pytest.raises(ExpansionForcedFail):
        expand("${if eq{a}{b}{yes} fail}")
    assert expand("${if eq{a}{a}{yes} fail }") == "yes"


def test_forced_fail_is_an_expansion_error():
    assert issubclass(ExpansionForcedFail, ExpansionError)


def test_match_ip_with_cidr_and_iplsearch(tmp_path):
    path = tmp_path / "nets"
    path.write_text("10.0.0.0/8: internal\n")
    text = ("${if match_ip{$sender_host_address}{<; 127.0.0.1 ; 192.0.2.0/24}{$value}{no}}"
            f" ${{if match_ip{{10.1.2.3}}{{iplsearch;{path}}}{{y}}{{n}}}}"
            " ${if match_ip{}{:1.2.3.4}{empty}{no}}")
    assert expand(text) == "192.0.2.7 y empty"


def test_match_domain_address_local_part_with_named_lists():
    named = NamedLists(domain={"local_domains": "example.com : *.example.net"})
    context = DictContext({"d": "mx.example.net"})
    compiled = compile_expansion(
        "${if match_domain{$d}{+local_domains}{y}{n}}"
        "${if match_address{Bob@Example.com}{bob@+local_domains}{y}{n}}"
        "${if match_local_part{alice}{Alice : bill}{$value}{n}}",
        named=named)
    assert compiled.expand(context) == "yyalice"


def test_match_list_is_not_expanded():
    with pytest.raises(ExpansionError, match="match_ip"):
        compile_expansion("${if match_ip{1.2.3.4}{$sender_host_address}}")


# -- lookups ----------------------------------------------------------------------------

@pytest.fixture
def limits(tmp_path):
    path = tmp_path / "proxy_limits"
    path.write_text("# per-IP connection limits\n"
                    "192.0.2.7: 50\n"
                    "192.0.2.0/24: 10\n"
                    '"2001:db8::1": 7\n'
                    '"2001:db8::/32" 3\n')
    return str(path)


def test_chapter_iplsearch_limit_line(limits):
    text = f"${{lookup{{$sender_host_address}}iplsearch{{{limits}}}}}"
    compiled = compile_expansion(text)
    lookups = LookupCache()
    for address, wanted in [("192.0.2.7", "50"), ("192.0.2.99", "10"), ("2001:db8::1", "7"),
                            ("2001:db8:1::1", "3"), ("198.51.100.1", "")]:
        context = DictContext({"sender_host_address": address}, lookups)
        assert compiled.expand(context) == wanted


def test_lookup_forms(ctx, tmp_path):
    path = tmp_path / "aliases"
    path.write_text("postmaster: root\nabuse: root, security\n")
    assert expand(f"${{lookup{{postmaster}}lsearch{{{path}}}}}", ctx) == "root"
    assert expand(f"${{lookup {{Abuse}} lsearch {{{path}}} {{<$value>}}}}", ctx) == \
        "<root, security>"
    assert expand(f"${{lookup{{nobody}}lsearch{{{path}}}{{yes}}{{no $value}}}}", ctx) == "no "
    assert expand(f"${{lookup{{nobody}}lsearch{{{path}}}{{$value}}}}", ctx) == ""
    with pytest.raises(ExpansionForcedFail):
        expand(f"${{lookup{{nobody}}lsearch{{{path}}}{{$value}}fail}}", ctx)


def test_nested_lookup_value_scoping(ctx, tmp_path):
    path = tmp_path / "chain"
    path.write_text("a: b\nb: c\n")
    text = (f"${{lookup{{a}}lsearch{{{path}}}"
            f"{{$value>${{lookup{{$value}}lsearch{{{path}}}{{$value}}}}>$value}}}}[$value]")
    assert expand(text, ctx) == "b>c>b[]"


def test_lookup_default_via_nested_lookup_in_no_string(ctx, tmp_path):
    path = tmp_path / "f"
    path.write_text("*: default\n")
    text = f"${{lookup{{x}}lsearch{{{path}}}{{$value}}{{${{lookup{{*}}lsearch{{{path}}}}}}}}}"
    assert expand(text, ctx) == "default"


def test_lookup_sees_file_change(ctx, tmp_path):
    path = tmp_path / "f"
    path.write_text("k: one\n")
    compiled = compile_expansion(f"${{lookup{{k}}lsearch{{{path}}}}}")
    assert compiled.expand(ctx) == "one"
    path.write_text("k: three\n")
    assert compiled.expand(ctx) == "three"


def test_lookup_missing_file_is_an_error(ctx, tmp_path):
    with pytest.raises(ExpansionError, match="DEFER"):
        expand(f"${{lookup{{k}}lsearch{{{tmp_path}/absent}}}}", ctx)


def test_iplsearch_with_non_ip_key_is_an_error(ctx, limits):
    with pytest.raises(ExpansionError, match="not a valid iplsearch key"):
        expand(f"${{lookup{{host.example}}iplsearch{{{limits}}}}}", ctx)


# -- compile-time errors ------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("${foo{x}}", 'unknown expansion item "foo"'),
    ("${foo:x}", 'unknown expansion operator "foo"'),
    ("${length_x:abc}", "unknown expansion operator"),
    ("${if foo{a}{b}}", 'unknown condition "foo"'),
    ("${if ne{a}{b}}", 'unknown condition "ne"'),
    ("${if =>{1}{2}}", 'unknown condition "=>"'),
    ("${if {a}}", "condition name expected"),
    ("${lookup{k}dbm{/etc/x}}", 'unknown lookup type "dbm"'),
    ("${lookup{k}partial-lsearch{/etc/x}}", "unknown lookup type"),
    ("${lookup mysql{select 1}}", "query-style lookup"),
    ("${lc:abc", "missing }"),
    ("${if eq{a}{b}", "missing"),
    ("${if eq{a}}", "wanted 2 arguments"),
    ("${sg{a}{b}}", "wanted 3 arguments"),
    ("${sg{a}{(}{b}}", "regular expression"),
    ("${if match{a}{[}}", "regular expression"),
    ("$", "not followed by letter"),
    ("$-", "not followed by letter"),
    ("${", "missing variable name"),
    ("${x", "missing }"),
    ("$h_subject:", "header expansions are not supported"),
    ("${if def:h_subject: {y}}", "header expansions are not supported"),
    ("${if match_ip{1.2.3.4}{*.example.com}}", "not an IP address pattern"),
    ("${if eq{a}{b}{y}{n}{z}}", "missing }"),
    ("${if and{{eq{a}{a}}", "missing"),
])
def test_compile_errors(text, message):
    with pytest.raises(ExpansionError, match=message.replace("{", "\\{").replace("$", "\\$")
                       .replace("(", "\\(").replace("[", "\\[")):
        compile_expansion(text)


def test_deep_nesting_is_an_error_not_a_crash():
    with pytest.raises(ExpansionError, match="nested too deeply"):
        compile_expansion("${lc:" * 500 + "x" + "}" * 500)
    with pytest.raises(ExpansionError):
        compile_expansion("${if " + "and{{" * 500)


# -- properties and speed ---------------------------------------------------------------------

_FRAGMENTS = st.sampled_from([
    "$", "{", "}", "\\", "\\N", "${", "$x", "${x}", "$empty", "$1", "${if ", "eq", "{a}", "def:x",
    "${lookup", "{k}", "lsearch", "iplsearch", "{/nonexistent}", "${lc:", "${eval:", "1+", "(",
    ")", "fail", " ", ":", "!", "and{", "or{", "match", "${sg", "${substr", "${length_2:", "_",
    "${mask:", "1.2.3.4/8", "${quote:", "=", "<", ">", "isip", "bool", "inlist", "match_ip",
    "${tr", "${domain:", "a@b", "x", "0x1f", "-", "*", "%",
])


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(max_size=60), st.lists(_FRAGMENTS, max_size=25).map("".join)))
def test_compile_and_expand_raise_only_expansion_errors(text):
    try:
        compiled = compile_expansion(text)
    except ExpansionError:
        return
    try:
        result = compiled.expand(DictContext({"x": "7", "empty": ""}))
    except ExpansionError:
        return
    assert isinstance(result, str)


def test_constant_expansion_is_cheap():
    compiled = compile_expansion("a plain option value")
    context = DictContext()
    start = time.perf_counter()
    for _ in range(100000):
        compiled.expand(context)
    assert (time.perf_counter() - start) / 100000 < 2e-6



def test_braces_outside_items_are_literal():
    assert expand("a}b{c} ${lc:X}") == "a}b{c} x"


def test_value_outside_any_lookup_comes_from_the_context():
    assert compile_expansion("[$value]").expand(DictContext({"value": "outer"})) == "[outer]"
    assert expand("[$value]") == "[]"


def test_huge_numbers_are_errors_not_crashes():
    with pytest.raises(ExpansionError, match="too large"):
        expand("${if >{" + "9" * 5000 + "}{1}}")
    with pytest.raises(ExpansionError):
        compile_expansion("$" + "1" * 5000)
