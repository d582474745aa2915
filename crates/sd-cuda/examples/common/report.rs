//! The PASS/FAIL report the GPU test programs (`gpu_tests`, `engine_tests`) print and
//! write: every line goes to stdout and to the text file; failed checks are kept so the
//! program can exit non-zero.

pub struct Report {
    pub text: String,
    pub failures: Vec<String>,
}

impl Report {
    pub fn new() -> Self {
        Self {
            text: String::new(),
            failures: Vec::new(),
        }
    }

    pub fn line(&mut self, s: String) {
        println!("{s}");
        self.text.push_str(&s);
        self.text.push('\n');
    }

    pub fn check(&mut self, name: &str, ok: bool, figure: String) {
        let s = format!("{} {name}: {figure}", if ok { "PASS" } else { "FAIL" });
        if !ok {
            self.failures.push(s.clone());
        }
        self.line(s);
    }
}
