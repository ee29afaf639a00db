//! `knn-diffusion bench plot`: the curves of BENCHMARKS.md as PNG files.
//!
//! A figure is a JSON file (`docs/bench/<name>.json`, [`Figure`]) holding measured points and
//! the section they come from; `bench plot` draws each one beside it as `<name>.png`. Every
//! figure is on log–log axes, where a straight line is a power law and its slope is the growth
//! exponent the scale goals are stated in; a dashed line of the goal's slope (say n^1.2, or
//! flat) can be drawn through a series' first point to read a goal off the plot.
//!
//! Text is drawn with a TrueType font read at run time (DejaVu Sans from Debian's
//! `fonts-dejavu-core`, which `scripts/setup.sh` installs, or `--font`/`KNN_PLOT_FONT`).

use anyhow::{bail, Context, Result};
use clap::Args;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Flags of `bench plot`.
#[derive(Debug, Args)]
pub struct BenchPlotArgs {
    /// Folder of figures (`<name>.json`); each PNG is written beside its JSON.
    #[arg(long, default_value = "docs/bench")]
    pub dir: PathBuf,
    /// TrueType font for the text (default: DejaVu Sans from Debian's fonts-dejavu-core).
    #[arg(long, env = "KNN_PLOT_FONT")]
    pub font: Option<PathBuf>,
}

/// One figure: log–log, one or more measured series.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Figure {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    /// Where the numbers were measured: the BENCHMARKS.md section, the machine and the date.
    pub source: String,
    pub series: Vec<Series>,
}

/// One measured curve.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Series {
    pub name: String,
    /// (x, y) pairs, each positive (the axes are logarithmic).
    pub points: Vec<[f64; 2]>,
    /// The slope of a goal, drawn dashed through the first point (1.2 for "no faster than
    /// n^1.2", 0 for "flat").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub goal_slope: Option<f64>,
}

const SIZE: (u32, u32) = (900, 560);
const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];
const FONT: &str = "sans-serif";

/// Where a font is looked for when `--font` (or `KNN_PLOT_FONT`) names none.
const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

/// Registers the font once per process (plotters keeps one table of fonts).
fn register_font(explicit: Option<&Path>) -> Result<()> {
    static DONE: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    let done = DONE.get_or_init(|| {
        let path = match explicit.map(Path::to_path_buf) {
            Some(p) => p,
            None => match FONT_PATHS.iter().map(PathBuf::from).find(|p| p.is_file()) {
                Some(p) => p,
                None => {
                    return Err(format!(
                        "no font for the plots' text: looked for {}. Install Debian's \
                         `fonts-dejavu-core` (scripts/setup.sh does), or name a .ttf file with \
                         --font or KNN_PLOT_FONT",
                        FONT_PATHS.join(" and ")
                    ))
                }
            },
        };
        let bytes = std::fs::read(&path)
            .map_err(|e| format!("reading the font {}: {e}", path.display()))?;
        // plotters keeps a font for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font(FONT, FontStyle::Normal, bytes).map_err(|_| {
            format!(
                "{} is not a TrueType font plotters can read",
                path.display()
            )
        })
    });
    done.clone().map_err(anyhow::Error::msg)
}

impl Figure {
    /// Every point positive and finite, at least one series with a point.
    fn check(&self) -> Result<()> {
        if self.series.iter().all(|s| s.points.is_empty()) {
            bail!("figure `{}` has no points", self.title);
        }
        for s in &self.series {
            for (i, [x, y]) in s.points.iter().enumerate() {
                if !(x.is_finite() && y.is_finite() && *x > 0.0 && *y > 0.0) {
                    bail!(
                        "figure `{}`, series `{}`, point {i} ({x}, {y}): the axes are \
                         logarithmic, so every x and y must be positive",
                        self.title,
                        s.name
                    );
                }
            }
        }
        Ok(())
    }

    /// Both axes' ranges, a little wider than the points on a log scale.
    fn ranges(&self) -> ((f64, f64), (f64, f64)) {
        let span = |v: &mut dyn Iterator<Item = f64>| {
            let (lo, hi) = v.fold((f64::MAX, f64::MIN), |(l, h), x| (l.min(x), h.max(x)));
            let pad = if hi > lo { (hi / lo).powf(0.08) } else { 2.0 };
            (lo / pad, hi * pad)
        };
        let pts = || self.series.iter().flat_map(|s| s.points.iter());
        (
            span(&mut pts().map(|p| p[0])),
            span(&mut pts().map(|p| p[1])),
        )
    }
}

/// Draws `fig` as a PNG image.
pub fn render(fig: &Figure, font: Option<&Path>) -> Result<Vec<u8>> {
    fig.check()?;
    register_font(font)?;
    let (w, h) = SIZE;
    let mut rgb = vec![0u8; (w * h * 3) as usize];
    draw(fig, &mut rgb).map_err(|e| anyhow::anyhow!("drawing figure `{}`: {e}", fig.title))?;
    let img = image::RgbImage::from_raw(w, h, rgb).context("plot buffer size")?;
    let mut png = std::io::Cursor::new(Vec::new());
    img.write_to(&mut png, image::ImageFormat::Png)?;
    Ok(png.into_inner())
}

fn draw(fig: &Figure, rgb: &mut [u8]) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let ((x0, x1), (y0, y1)) = fig.ranges();
    let root = BitMapBackend::with_buffer(rgb, SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(&fig.title, (FONT, 22))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())?;
    chart
        .configure_mesh()
        .x_desc(&fig.x_label)
        .y_desc(&fig.y_label)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .draw()?;
    for (i, s) in fig.series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let pts: Vec<(f64, f64)> = s.points.iter().map(|p| (p[0], p[1])).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), colour.stroke_width(2)))?
            .label(&s.name)
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 24, y)], colour.stroke_width(2)));
        chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, colour.filled())))?;
        if let (Some(slope), Some(&(px, py))) = (s.goal_slope, pts.first()) {
            // Dashes of a twentieth of the x range each, every other one drawn.
            let steps = 20;
            let at = |t: f64| {
                let x = x0 * (x1 / x0).powf(t);
                (x, py * (x / px).powf(slope))
            };
            let dashes = (0..steps).step_by(2).map(|k| {
                let (a, b) = (k as f64 / steps as f64, (k + 1) as f64 / steps as f64);
                PathElement::new([at(a), at(b)], colour.mix(0.6).stroke_width(1))
            });
            chart.draw_series(dashes)?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.draw(&Text::new(
        fig.source.clone(),
        (16, SIZE.1 as i32 - 18),
        (FONT, 12).into_font().color(&RGBColor(90, 90, 90)),
    ))?;
    root.present()?;
    Ok(())
}

/// Draws every `<name>.json` figure in `dir` as `<name>.png` beside it; the PNGs written.
pub fn render_dir(dir: &Path, font: Option<&Path>) -> Result<Vec<PathBuf>> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    names.sort();
    if names.is_empty() {
        bail!("{} holds no figure (<name>.json)", dir.display());
    }
    let mut written = Vec::new();
    for json in names {
        let text = std::fs::read_to_string(&json)
            .with_context(|| format!("reading {}", json.display()))?;
        let fig: Figure = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a figure", json.display()))?;
        let png = render(&fig, font).with_context(|| format!("in {}", json.display()))?;
        let out = json.with_extension("png");
        std::fs::write(&out, png).with_context(|| format!("writing {}", out.display()))?;
        written.push(out);
    }
    Ok(written)
}
