//! Flame graphs as inline SVG (root at the top): the tree of the profile's folded stacks
//! (the same [`folded_stacks`] every file writer uses), frames laid out by value, widest
//! first, with a `<title>` each; the script zooms, searches and resets. A differential
//! graph has a baseline too: widths are the window's time, colour how much a frame grew
//! (red) or shrank (blue) against the baseline scaled to the window's length.
//!
//! [`folded_stacks`]: stallscope_profile::folded_stacks

use std::{collections::HashMap, fmt::Write as _};

use maud::{Markup, html};
use stallscope_profile::{FoldedStack, view::KERNEL_SUFFIX};

use super::html::human_total;

/// Frames narrower than this share of the total are not drawn (like inferno's minimum
/// width); the graph says how many.
const MIN_FRACTION: f64 = 0.000_5;
/// At most this many frames are drawn (the narrowest left out first).
const MAX_FRAMES: usize = 6000;
const ROW: u32 = 18;

#[derive(Debug, Clone)]
struct Node {
    name: String,
    value: u64,
    /// Baseline time (scaled to the window's length), for differential graphs.
    base: f64,
    depth: u32,
    start: u64,
    children: Vec<usize>,
}

/// A profile's frame tree.
#[derive(Debug, Clone)]
pub struct Flame {
    nodes: Vec<Node>,
    differential: bool,
}

fn child(
    nodes: &mut Vec<Node>,
    index: &mut HashMap<(usize, String), usize>,
    parent: usize,
    name: &str,
) -> usize {
    if let Some(&found) = index.get(&(parent, name.to_owned())) {
        return found;
    }
    let depth = nodes[parent].depth + 1;
    nodes.push(Node {
        name: name.to_owned(),
        value: 0,
        base: 0.0,
        depth,
        start: 0,
        children: Vec::new(),
    });
    let id = nodes.len() - 1;
    nodes[parent].children.push(id);
    index.insert((parent, name.to_owned()), id);
    id
}

impl Flame {
    /// The tree of `stacks`; with a baseline, each frame also gets the baseline's time
    /// times `baseline_factor`.
    pub fn build(stacks: &[FoldedStack], baseline: Option<(&[FoldedStack], f64)>) -> Self {
        let mut nodes = vec![Node {
            name: "all".to_owned(),
            value: 0,
            base: 0.0,
            depth: 0,
            start: 0,
            children: Vec::new(),
        }];
        let mut index: HashMap<(usize, String), usize> = HashMap::new();
        for (frames, value) in stacks {
            let mut at = 0;
            nodes[0].value += value;
            for frame in frames {
                at = child(&mut nodes, &mut index, at, frame);
                nodes[at].value += value;
            }
        }
        if let Some((base_stacks, factor)) = baseline {
            for (frames, value) in base_stacks {
                let scaled = *value as f64 * factor;
                let mut at = 0;
                nodes[0].base += scaled;
                for frame in frames {
                    at = child(&mut nodes, &mut index, at, frame);
                    nodes[at].base += scaled;
                }
            }
        }
        // Widest first, then by name: the same profile always looks the same.
        let mut order: Vec<usize> = vec![0];
        while let Some(id) = order.pop() {
            let mut children = std::mem::take(&mut nodes[id].children);
            children.sort_by(|&a, &b| {
                nodes[b]
                    .value
                    .cmp(&nodes[a].value)
                    .then_with(|| nodes[a].name.cmp(&nodes[b].name))
            });
            let mut start = nodes[id].start;
            for &c in &children {
                nodes[c].start = start;
                start += nodes[c].value;
                order.push(c);
            }
            nodes[id].children = children;
        }
        Self {
            nodes,
            differential: baseline.is_some(),
        }
    }

    pub fn total(&self) -> u64 {
        self.nodes[0].value
    }

    /// The frames drawn: at least [`MIN_FRACTION`] wide, at most [`MAX_FRAMES`] of them;
    /// and how many were left out.
    fn drawn(&self) -> (Vec<usize>, usize) {
        let total = self.total().max(1) as f64;
        let mut threshold = (total * MIN_FRACTION).ceil() as u64;
        let mut wide: Vec<u64> = self
            .nodes
            .iter()
            .map(|n| n.value)
            .filter(|&v| v >= threshold.max(1))
            .collect();
        if wide.len() > MAX_FRAMES {
            wide.sort_unstable_by(|a, b| b.cmp(a));
            threshold = wide[MAX_FRAMES - 1] + 1;
        }
        let mut drawn = Vec::new();
        let mut stack = vec![0];
        while let Some(id) = stack.pop() {
            let node = &self.nodes[id];
            if node.value == 0 || (id != 0 && node.value < threshold.max(1)) {
                continue;
            }
            drawn.push(id);
            stack.extend(node.children.iter().rev());
        }
        let visible = self.nodes.iter().filter(|n| n.value > 0).count();
        let hidden = visible - drawn.len();
        (drawn, hidden)
    }

    /// The SVG, with the data the script needs (`data-x`, `data-w`, `data-d` in the
    /// profile's units, `data-b` the baseline).
    pub fn svg(&self) -> Markup {
        let (drawn, hidden) = self.drawn();
        let total = self.total().max(1);
        let depth = drawn
            .iter()
            .map(|&id| self.nodes[id].depth)
            .max()
            .unwrap_or(0);
        let height = (depth + 1) * ROW + 4;
        html! {
            @if hidden > 0 {
                p.note { (hidden) " frames narrower than " (MIN_FRACTION * 100.0) "% of the total are not drawn; zoom in with a filter to see them." }
            }
            div.flame-wrap {
                svg.flame width="100%" height=(height) data-total=(total) data-diff=[self.differential.then_some("1")] role="img" aria-label="flame graph" {
                    @for &id in &drawn {
                        (self.frame(&self.nodes[id], total))
                    }
                }
            }
        }
    }

    fn frame(&self, node: &Node, total: u64) -> Markup {
        let x = node.start as f64 / total as f64 * 100.0;
        let w = node.value as f64 / total as f64 * 100.0;
        let y = node.depth * ROW;
        let (name, kernel) = match node.name.strip_suffix(KERNEL_SUFFIX) {
            Some(stripped) => (stripped, true),
            None => (node.name.as_str(), false),
        };
        let own: u64 = node.value
            - node
                .children
                .iter()
                .map(|&c| self.nodes[c].value)
                .sum::<u64>();
        let mut title = format!(
            "{name}{}\n{} ({:.2}%), self {}",
            if kernel { " (kernel)" } else { "" },
            human_total(node.value as f64),
            node.value as f64 / total as f64 * 100.0,
            human_total(own as f64)
        );
        if self.differential {
            let change = node.value as f64 - node.base;
            let _ = write!(
                title,
                "\nbaseline {}, change {}{}",
                human_total(node.base),
                if change >= 0.0 { "+" } else { "-" },
                human_total(change.abs())
            );
        }
        // A first guess at what fits (about 1200 px wide, 7 px a character); the script
        // fits the text to the real width.
        let fits = (w / 100.0 * 1200.0 / 7.0) as usize;
        let label: String = if fits < 4 {
            String::new()
        } else if name.chars().count() > fits {
            name.chars().take(fits - 2).chain("..".chars()).collect()
        } else {
            name.to_owned()
        };
        html! {
            g.fr data-x=(node.start) data-w=(node.value) data-d=(node.depth) data-b=[self.differential.then(|| format!("{:.0}", node.base))] {
                title { (title) }
                rect x={(format!("{x:.4}")) "%"} y=(y) width={(format!("{w:.4}")) "%"} height=(ROW - 1) fill=(self.colour(node, name, kernel)) {}
                text x={(format!("{:.4}", x + 0.15)) "%"} y=(y + 13) { (label) }
            }
        }
    }

    fn colour(&self, node: &Node, name: &str, kernel: bool) -> String {
        if self.differential {
            let change = node.value as f64 - node.base;
            let scale = (node.value as f64).max(node.base).max(1.0);
            let intensity = (change.abs() / scale).clamp(0.0, 1.0);
            let fade = (235.0 - intensity * 175.0).round() as u8;
            return if change.abs() / scale < 0.02 {
                "rgb(235,235,235)".to_owned()
            } else if change > 0.0 {
                format!("rgb(250,{fade},{fade})")
            } else {
                format!("rgb({fade},{fade},250)")
            };
        }
        let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let [a, b, c] = [
            (hash & 0xff) as f64,
            ((hash >> 8) & 0xff) as f64,
            ((hash >> 16) & 0xff) as f64,
        ]
        .map(|v| v / 255.0);
        if node.depth == 0 {
            "rgb(200,200,205)".to_owned()
        } else if node.depth == 1 || name.starts_with('[') {
            // Signals and other label frames: not code.
            format!(
                "rgb({},{},{})",
                150 + (a * 30.0) as u8,
                170 + (b * 30.0) as u8,
                205 + (c * 30.0) as u8
            )
        } else if kernel {
            format!(
                "rgb({},{},{})",
                225 + (a * 25.0) as u8,
                135 + (b * 55.0) as u8,
                40 + (c * 30.0) as u8
            )
        } else {
            format!(
                "rgb({},{},{})",
                205 + (a * 50.0) as u8,
                (b * 200.0) as u8 + 30,
                (c * 55.0) as u8
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stacks(lines: &[(&[&str], u64)]) -> Vec<FoldedStack> {
        lines
            .iter()
            .map(|(frames, value)| (frames.iter().map(|f| (*f).to_owned()).collect(), *value))
            .collect()
    }

    #[test]
    fn frames_are_laid_out_widest_first() {
        let flame = Flame::build(
            &stacks(&[
                (&["off-cpu", "main", "read"], 30),
                (&["off-cpu", "main", "lock"], 60),
                (&["on-cpu", "main"], 10),
            ]),
            None,
        );
        assert_eq!(flame.total(), 100);
        let svg = flame.svg().into_string();
        assert!(
            svg.contains(r#"data-x="0" data-w="90" data-d="1""#),
            "{svg}"
        );
        // `lock` (60) comes before `read` (30) under main.
        assert!(
            svg.contains(r#"data-x="0" data-w="60" data-d="3""#),
            "{svg}"
        );
        assert!(
            svg.contains(r#"data-x="60" data-w="30" data-d="3""#),
            "{svg}"
        );
        assert!(
            svg.contains(r#"data-x="90" data-w="10" data-d="1""#),
            "{svg}"
        );
    }

    #[test]
    fn names_are_text_and_kernel_frames_say_so() {
        let flame = Flame::build(
            &stacks(&[(
                &["off-cpu", "<img src=x onerror=alert(1)>", "schedule_[k]"],
                5,
            )]),
            None,
        );
        let svg = flame.svg().into_string();
        assert!(!svg.contains("<img"), "{svg}");
        assert!(svg.contains("&lt;img src=x onerror=alert(1)&gt;"), "{svg}");
        assert!(svg.contains("schedule (kernel)"), "{svg}");
    }

    #[test]
    fn differential_frames_carry_the_baseline() {
        let after = stacks(&[(&["a", "grew"], 80), (&["a", "same"], 20)]);
        let before = stacks(&[(&["a", "grew"], 20), (&["a", "same"], 40)]);
        let flame = Flame::build(&after, Some((&before, 0.5)));
        let svg = flame.svg().into_string();
        assert!(
            svg.contains(r#"data-w="80" data-d="2" data-b="10""#),
            "{svg}"
        );
        assert!(
            svg.contains(r#"data-w="20" data-d="2" data-b="20""#),
            "{svg}"
        );
        assert!(svg.contains("fill=\"rgb(250,"), "growth is red: {svg}");
    }

    #[test]
    fn narrow_frames_are_counted_not_drawn() {
        let mut lines: Vec<FoldedStack> = stacks(&[(&["big"], 1_000_000)]);
        lines.push((vec!["tiny".to_owned()], 1));
        let svg = Flame::build(&lines, None).svg().into_string();
        assert!(svg.contains("1 frames narrower"), "{svg}");
        assert!(!svg.contains(">tiny<"), "{svg}");
    }
}
