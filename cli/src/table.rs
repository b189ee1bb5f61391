//! Plain-text tables whose columns fit their content: each column is as wide as its
//! widest cell, up to a cap; a longer cell is shortened in the middle (`kube…-7f9c`) so
//! the columns after it stay aligned. The last column is never cut. `--json` carries the
//! full values.

/// How a column aligns its cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

/// A column: its header, alignment and widest allowed cell.
#[derive(Debug, Clone, Copy)]
pub struct Column {
    pub header: &'static str,
    pub align: Align,
    pub max_width: usize,
}

impl Column {
    pub const fn left(header: &'static str, max_width: usize) -> Self {
        Self {
            header,
            align: Align::Left,
            max_width,
        }
    }

    pub const fn right(header: &'static str) -> Self {
        Self {
            header,
            align: Align::Right,
            max_width: 24,
        }
    }
}

/// Shortens `text` to at most `width` characters, keeping its start and end.
pub fn shorten(text: &str, width: usize) -> String {
    let chars: Vec<char> = text.chars().collect();
    if chars.len() <= width || width < 3 {
        return text.to_owned();
    }
    let keep = width - 1;
    let head = keep.div_ceil(2);
    let tail = keep - head;
    let mut out: String = chars[..head].iter().collect();
    out.push('…');
    out.extend(&chars[chars.len() - tail..]);
    out
}

/// Lays out `rows` under `columns`, two spaces between columns, one line per row.
pub fn render(columns: &[Column], rows: &[Vec<String>]) -> String {
    let last = columns.len().saturating_sub(1);
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|row| {
            row.iter()
                .enumerate()
                .map(|(i, cell)| match columns.get(i) {
                    Some(column) if i < last => shorten(cell, column.max_width),
                    _ => cell.clone(),
                })
                .collect()
        })
        .collect();
    let widths: Vec<usize> = columns
        .iter()
        .enumerate()
        .map(|(i, column)| {
            cells
                .iter()
                .filter_map(|row| row.get(i))
                .map(|cell| cell.chars().count())
                .chain([column.header.chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |values: Vec<&str>| -> String {
        let mut text = String::new();
        for (i, value) in values.iter().enumerate() {
            if i > 0 {
                text.push_str("  ");
            }
            let width = widths.get(i).copied().unwrap_or(0);
            let pad = width.saturating_sub(value.chars().count());
            let align = columns.get(i).map_or(Align::Left, |c| c.align);
            if i == last && align == Align::Left {
                text.push_str(value);
            } else if align == Align::Right {
                text.push_str(&" ".repeat(pad));
                text.push_str(value);
            } else {
                text.push_str(value);
                text.push_str(&" ".repeat(pad));
            }
        }
        text.trim_end().to_owned()
    };
    let mut out = line(columns.iter().map(|c| c.header).collect());
    out.push('\n');
    for row in &cells {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_fit_their_content_and_long_cells_are_shortened_in_the_middle() {
        let columns = [
            Column::left("SERVICE", 12),
            Column::right("WAIT"),
            Column::left("SIGNALS", 10),
        ];
        let rows = vec![
            vec!["a".to_owned(), "1.0s".to_owned(), "off-cpu".to_owned()],
            vec![
                "a-very-long-service-name".to_owned(),
                "12.5s".to_owned(),
                "off-cpu,on-cpu,lock".to_owned(),
            ],
        ];
        let text = render(&columns, &rows);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "SERVICE        WAIT  SIGNALS");
        assert_eq!(lines[1], "a              1.0s  off-cpu");
        assert_eq!(lines[2], "a-very…-name  12.5s  off-cpu,on-cpu,lock");
        assert_eq!(shorten("abcdefghij", 5), "ab…ij");
    }
}
