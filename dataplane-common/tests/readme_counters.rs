//! The README's counter table lists exactly the counters the programs
//! emit, with the numbers, names and meanings of [`Stat`]; retired numbers
//! stay out of it.

use dataplane_common::{Stat, ct::CtGc};

const HEADING: &str = "Counters (`stats_v2` index";
/// The sweeper's counters (`ct_gc_v1`) follow this line.
const GC_HEADING: &str = "Its counters are kept pinned";

/// The `| # | name | meaning |` rows of the table after [`HEADING`].
fn readme_rows() -> Vec<(u32, String, String)> {
    table_after(HEADING)
}

fn table_after(heading: &str) -> Vec<(u32, String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md");
    let readme = std::fs::read_to_string(path).expect("README.md readable");
    let start = readme
        .find(heading)
        .expect("counter table heading in README");
    readme[start..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2) // header and separator
        .map(|l| {
            let cells: Vec<&str> = l.trim_matches('|').split('|').map(str::trim).collect();
            assert_eq!(cells.len(), 3, "three cells in {l:?}");
            let n = cells[0]
                .parse()
                .unwrap_or_else(|_| panic!("number in {l:?}"));
            (n, cells[1].to_owned(), cells[2].to_owned())
        })
        .collect()
}

#[test]
fn readme_counter_table_matches_stat() {
    let want: Vec<(u32, String, String)> = Stat::ALL
        .iter()
        .map(|&s| (s as u32, s.name().to_owned(), s.meaning().to_owned()))
        .collect();
    assert_eq!(readme_rows(), want);
}

#[test]
fn retired_numbers_are_not_listed() {
    for (n, name, _) in readme_rows() {
        assert!(!Stat::RETIRED.contains(&n), "{n} ({name}) is retired");
    }
}

#[test]
fn readme_sweeper_counter_table_matches_ct_gc() {
    let want: Vec<(u32, String, String)> = CtGc::ALL
        .iter()
        .map(|&c| (c as u32, c.name().to_owned(), c.meaning().to_owned()))
        .collect();
    assert_eq!(table_after(GC_HEADING), want);
}
